"""The experts' grouped matmul on the CPU, parallel over experts: a small C++ extension.

`torch.nn.functional.grouped_mm` on the CPU runs one oneDNN `mm` per expert, each split over all
threads. For `tiny`'s groups (~512 x 256 x 256) that split costs more than it gives: on this 2-core
machine one thread does a gate/up grouped GEMM in 1.4-1.6 ms, two threads take 2.4-2.9 ms. Here every
thread takes whole experts instead (largest first onto the least loaded thread), and each expert's
GEMM runs single-threaded inside that parallel region: forward 1.0 vs 1.4 ms, weight gradient 1.5 vs
2.0 ms in a hot loop; the compiled `tiny` training step 2-4% faster. Results are the
same `mm` calls, so bit for bit equal to `grouped_mm` (tests/test_cpu_experts.py).

Two ops, both registered with torch.library so `torch.compile` keeps them in its graph as opaque calls:
  experts_mm(x [R, K], w [E, K, N], offs [E]) -> [R, N]       y[g_e] = x[g_e] @ w[e]
  experts_mm_wgrad(x [R, K], dy [R, N], offs [E], E) -> [E, K, N]   dw[e] = x[g_e]^T dy[g_e]
with offs the int32 end row of each expert's group (grouped_mm's convention); rows after the last
group come back zero, an empty expert's weight gradient is zero. The backward of experts_mm is
experts_mm with w transposed (dx) and experts_mm_wgrad(dy, x)^T (dw, formed in the [E, N, K] layout
of the parameters it flows back to, so their fp32 cast is a contiguous pass: ~10 ms a `tiny` step).

The C++ is compiled on first use (`load()`, ~30 s, then cached by torch in
~/.cache/torch_extensions); where that fails (no C++ compiler) `load()` warns once and returns
False, and callers keep `grouped_mm`. `mellum2.kernels.install` gives it to the experts of a model on
a CPU (the trainer's `parallelize` calls it).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <numeric>
#include <vector>

// experts split into one bin per thread, largest first onto the least loaded bin
static std::vector<std::vector<int64_t>> bins_of(const std::vector<int64_t>& cost, int64_t nbins) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<std::vector<int64_t>> bins(std::max<int64_t>(1, nbins));
  std::vector<int64_t> load(bins.size(), 0);
  for (int64_t e : order) {
    if (cost[e] == 0) continue;
    auto b = std::min_element(load.begin(), load.end()) - load.begin();
    bins[b].push_back(e);
    load[b] += cost[e];
  }
  return bins;
}

static std::vector<int64_t> bounds_of(const at::Tensor& offs, int64_t E, int64_t rows) {
  TORCH_CHECK(offs.dim() == 1 && offs.size(0) == E, "experts_mm: offs must be [E]");
  auto o = offs.to(at::kLong).contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  std::vector<int64_t> b(E + 1, 0);
  for (int64_t e = 0; e < E; e++) {
    b[e + 1] = p[e];
    TORCH_CHECK(b[e + 1] >= b[e] && b[e + 1] <= rows, "experts_mm: offs must be non-decreasing and <= rows");
  }
  return b;
}

// fn(e, first row, rows) for every non-empty expert, each thread taking whole experts
template <typename F>
static void for_each_expert(const std::vector<int64_t>& b, const F& fn) {
  int64_t E = (int64_t)b.size() - 1;
  std::vector<int64_t> cost(E);
  for (int64_t e = 0; e < E; e++) cost[e] = b[e + 1] - b[e];
  auto bins = bins_of(cost, at::get_num_threads());
  at::parallel_for(0, (int64_t)bins.size(), 1, [&](int64_t lo, int64_t hi) {
    at::AutoDispatchBelowADInplaceOrView below_autograd_in_worker;  // thread-local: set on every worker
    at::NoGradGuard no_grad_in_worker;
    for (int64_t i = lo; i < hi; i++)
      for (int64_t e : bins[i]) fn(e, b[e], cost[e]);
  });
}

// y[g_e] = x[g_e] @ w[e]; x [R, K], w [E, K, N] -> [R, N]; rows after the last group are zero
at::Tensor experts_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::NoGradGuard no_grad;
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(1), "experts_mm: shapes");
  int64_t E = w.size(0), R = x.size(0);
  auto b = bounds_of(offs, E, R);
  auto out = at::empty({R, w.size(2)}, x.options());
  if (b[E] < R) out.narrow(0, b[E], R - b[E]).zero_();
  for_each_expert(b, [&](int64_t e, int64_t s, int64_t n) {
    auto o = out.narrow(0, s, n);
    at::mm_out(o, x.narrow(0, s, n), w.select(0, e));
  });
  return out;
}

// dw[e] = x[g_e]^T @ dy[g_e]; x [R, K], dy [R, N] -> [E, K, N] (zero for empty experts)
at::Tensor experts_mm_wgrad(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& offs, int64_t E) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::NoGradGuard no_grad;
  TORCH_CHECK(x.dim() == 2 && dy.dim() == 2 && x.size(0) == dy.size(0), "experts_mm_wgrad: shapes");
  auto b = bounds_of(offs, E, x.size(0));
  auto out = at::empty({E, x.size(1), dy.size(1)}, x.options());
  for (int64_t e = 0; e < E; e++)
    if (b[e + 1] == b[e]) out.select(0, e).zero_();
  for_each_expert(b, [&](int64_t e, int64_t s, int64_t n) {
    auto o = out.select(0, e);
    at::mm_out(o, x.narrow(0, s, n).t(), dy.narrow(0, s, n));
  });
  return out;
}
"""

_ext = None  # the loaded extension; False once loading failed


def load() -> bool:
    """Build (first time) and load the extension; False (after one warning) where that fails."""
    global _ext
    if _ext is None:
        try:
            from torch.utils.cpp_extension import _get_build_directory, load_inline  # heavy; only to build

            build_dir = Path(_get_build_directory("mellum2_cpu_experts", verbose=False))
            if not any(build_dir.glob("*.so")):
                print("mellum2: building the CPU experts matmul (once, ~30 s; cached in "
                      f"{build_dir})", file=sys.stderr, flush=True)
            _ext = load_inline("mellum2_cpu_experts", cpp_sources=_SRC,
                               functions=["experts_mm", "experts_mm_wgrad"],
                               extra_cflags=["-O2", "-fopenmp"], verbose=False)
        except Exception as e:  # noqa: BLE001 (compiler missing or failing: grouped_mm stays)
            warnings.warn(f"mellum2: building the CPU experts matmul failed ({type(e).__name__}: {e}); "
                          "using torch's grouped_mm", stacklevel=2)
            _ext = False
    return _ext is not False


def _lib():
    """The loaded extension, or a clear error where it cannot be built."""
    if not load():
        raise RuntimeError("mellum2::experts_mm: the CPU extension could not be built; use torch's grouped_mm")
    return _ext


@torch.library.custom_op("mellum2::experts_mm", mutates_args=())
def experts_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return _lib().experts_mm(x, w, offs)


@experts_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("mellum2::experts_mm_wgrad", mutates_args=())
def experts_mm_wgrad(x: Tensor, dy: Tensor, offs: Tensor, num_experts: int) -> Tensor:
    return _lib().experts_mm_wgrad(x, dy, offs, num_experts)


@experts_mm_wgrad.register_fake
def _(x, dy, offs, num_experts):
    return x.new_empty(num_experts, x.shape[1], dy.shape[1])


def _setup_context(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx = experts_mm(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = experts_mm_wgrad(dy, x, offs, w.shape[0]).transpose(1, 2) if ctx.needs_input_grad[1] else None
    return dx, dw, None


experts_mm.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Drop-in for `F.grouped_mm(x, w, offs=offs)` on 2-D x and 3-D w (the experts' `gmm`), where
    `load()` is True."""
    return experts_mm(x, w, offs)


grouped_mm.per_group_gemms = True  # one oneDNN GEMM per expert, like torch's: Experts.pad_of pads its groups
