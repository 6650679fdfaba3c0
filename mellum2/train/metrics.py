"""What a run reports: `metrics.jsonl` (one line per step), TensorBoard scalars, a tqdm bar, expert-load
statistics, MFU, and the loss-curve PNG drawn at the end.

The trainer keeps each step's numbers as tensors and hands them over in batches (`log_steps`), so
the host syncs once per logging interval, not per micro-batch. Only rank 0 writes.

metrics.jsonl fields: step (1-based count of finished steps), tokens (global, after the step), lr,
phase (0..2), loss (the objective: ce + w_mtp mtp + c_lb lb + c_z z), ce, mtp, lb, z, grad_norm,
skipped (non-finite step not applied), tok_s and mfu (over the interval), and per MoE layer
load_min / load_max (smallest / largest expert share times E: 1.0 = balanced, 0 = a dead expert)
and load_entropy (entropy of the shares / ln E: 1.0 = balanced).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mellum2 import atomic


def expert_load(counts_LE: torch.Tensor) -> dict[str, list[float]]:
    """Per-layer min/max share (x E) and normalised entropy of routed-slot counts [L, E]."""
    c = counts_LE.double()
    E = c.shape[-1]
    share_LE = c / c.sum(-1, keepdim=True).clamp(min=1)
    ent_L = -(share_LE * share_LE.clamp(min=1e-30).log()).sum(-1) / math.log(E)
    return {"load_min": (share_LE.min(-1).values * E).tolist(), "load_max": (share_LE.max(-1).values * E).tolist(),
            "load_entropy": ent_L.tolist()}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """Achievable matmul FLOP/s of `device` at `dtype` (square n x n GEMMs for ~`seconds`)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters, t0 = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        sync()
        dt = time.perf_counter() - t0
        if dt > seconds:
            return 2 * n ** 3 * iters / dt


def truncate_jsonl(path: Path, last_step: int) -> tuple[int, int]:
    """Repair metrics.jsonl for a run resuming after `last_step`: keep every valid record with
    step <= last_step, drop torn or garbled lines (a killed run's last line, a damaged byte anywhere)
    and the records of the steps the resumed run will redo. Returns (garbled, after) counts dropped."""
    if not path.exists():
        return 0, 0
    keep, garbled, after = [], 0, 0
    for line in path.read_bytes().splitlines():
        rec = _record(line)
        if rec is None:
            garbled += 1
        elif rec["step"] > last_step:
            after += 1
        else:
            keep.append(line.decode())
    if garbled or after:
        atomic.write_text(path, "".join(x + "\n" for x in keep))
    return garbled, after


def _record(line: bytes) -> dict | None:
    """One metrics.jsonl line as a record, or None when it is not one (torn, garbled, blank)."""
    try:
        rec = json.loads(line.decode())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool)
    return rec if ok else None


def read_jsonl(path: Path) -> list[dict]:
    """The valid records of a metrics.jsonl (torn or garbled lines skipped)."""
    return [r for line in Path(path).read_bytes().splitlines() if (r := _record(line)) is not None]


class MetricsLogger:
    """Rank-0 sink for per-step records: jsonl + TensorBoard + progress bar."""

    def __init__(self, out_dir: Path, *, enabled: bool, total_steps: int, start_step: int, start_tokens: int,
                 flops_per_token: float, peak_flops: float | None, tensorboard: bool = True, progress: bool = True,
                 say=print):
        self.enabled = enabled
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = self.bar = None
        self._t, self._tokens = time.perf_counter(), start_tokens
        if not enabled:
            return
        garbled, after = truncate_jsonl(self.path, start_step)
        if garbled or after:
            say(f"{self.path}: dropped {garbled} torn or garbled line(s) and {after} record(s) after step "
                f"{start_step} (redone by this run); kept the rest")
        self.f = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard, protobuf): only when used

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            mininterval=1.0)

    def log_steps(self, records: list[dict]) -> None:
        """records: finished steps in order, numbers already on the host."""
        if not self.enabled or not records:
            return
        now = time.perf_counter()
        tokens = records[-1]["tokens"]
        tok_s = (tokens - self._tokens) / (now - self._t) if now > self._t else float("nan")
        self._t, self._tokens = now, tokens
        mfu = tok_s * self.flops_per_token / self.peak_flops if self.peak_flops else float("nan")
        for r in records:
            r["tok_s"], r["mfu"] = tok_s, mfu
            self.f.write(json.dumps(r, allow_nan=True) + "\n")
            if self.tb is not None:
                for k, v in r.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self.tb.add_scalar(f"train/{k}", v, r["step"])
                    elif isinstance(v, list):
                        for i, x in enumerate(v):
                            self.tb.add_scalar(f"{k}/layer{i}", x, r["step"])
        self.f.flush()
        if self.bar is not None:
            last = records[-1]
            self.bar.update(len(records))
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{last['lr']:.2e}",
                                 mfu=f"{mfu:.1%}" if mfu == mfu else "n/a", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        try:
            self.f.close()
        except OSError:
            pass  # a full disk: the loop already reports it, with what was saved last
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def summarize(records: list[dict], boundaries_steps: list[int], tail: int = 10) -> dict:
    """Loss at the start and end of each phase (end = mean of the phase's last `tail` applied steps)."""
    good = [r for r in records if not r.get("skipped")]
    out: dict = {"steps": len(records), "skipped": len(records) - len(good),
                 "tokens": records[-1]["tokens"] if records else 0, "phases": []}
    for k in range(3):
        rs = [r for r in good if r.get("phase") == k]
        if rs:
            end = rs[-tail:]
            out["phases"].append({"phase": k + 1, "first_step": rs[0]["step"], "last_step": rs[-1]["step"],
                                  "loss_start": rs[0]["loss"], "loss_end": sum(r["loss"] for r in end) / len(end),
                                  "ce_end": sum(r["ce"] for r in end) / len(end)})
    rates = [r["tok_s"] for r in records if r.get("tok_s") == r.get("tok_s") and r.get("tok_s") is not None]
    if rates:
        out["tok_s_median"] = sorted(rates)[len(rates) // 2]
    out["phase_boundaries_steps"] = boundaries_steps
    return out


def plot_losses(metrics_path: Path, png_path: Path, boundaries_steps: list[int], label: str = "phase") -> None:
    """Loss, CE and MTP CE against steps, boundaries as vertical lines (all but the last entry, the end:
    where phases 2 and 3, or epochs 2.., start, named by `label`); LR on a second axis."""
    import matplotlib  # heavy, and only for the picture at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_jsonl(metrics_path) if not r.get("skipped")]
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(9, 5))
    for key, style in (("loss", "-"), ("ce", "--"), ("mtp", ":")):
        if key in recs[0]:
            ax.plot(steps, [r[key] for r in recs], style, label=key, linewidth=1)
    for i, b in enumerate(boundaries_steps[:-1]):  # b = finished steps when the phase starts
        b = b + 0.5
        ax.axvline(b, color="grey", linestyle="-.", linewidth=0.8)
        ax.text(b, ax.get_ylim()[1], f" {label} {i + 2}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend(loc="upper center")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in recs], color="tab:red", alpha=0.4, linewidth=1)
    ax2.set_ylabel("lr", color="tab:red")
    fig.tight_layout()
    with atomic.atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
