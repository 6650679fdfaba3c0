"""The compiled decode steps treat the KV cache they write in place as static inputs: on a GPU,
cudagraphs (mode="reduce-overhead") skips a graph with mutated inputs that are not static ("skipping
cudagraphs due to mutated inputs"), so every input a step mutates must be a static one. Checked on the
CPU from AOT autograd's metadata of the traced step (no inductor, no GPU), plain and speculative, with
a negative control: without marking the cache static, the same check fails."""
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._guards import TracingContext

from mellum2 import Mellum2, ModelConfig
from mellum2.infer import Engine, SamplingParams
from mellum2.infer.kvcache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mellum2(ModelConfig.from_preset("test-small")).eval()


def traced_inputs(model, speculative):
    """(mutated input indices, static input indices) of every step graph the engine compiled."""
    graphs = []

    def inspect(gm, inputs):
        meta = TracingContext.try_get().fw_metadata
        graphs.append(({i for i, info in enumerate(meta.input_info) if info.mutates_data},
                       set(meta.static_input_indices)))
        return gm

    backend = aot_autograd(fw_compiler=inspect)
    torch._dynamo.reset()
    eng = Engine(model, compile=True)
    eng.compiled._compile = lambda fn: torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    got = eng.generate([[5, 9, 11], [7] * 9], params, speculative=speculative, draft_tokens=2)
    want = Engine(model).generate([[5, 9, 11], [7] * 9], params)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert graphs
    return graphs


@pytest.mark.parametrize("speculative", [False, True])
def test_compiled_steps_mutate_only_static_inputs(model, speculative):
    for mutated, static in traced_inputs(model, speculative):
        assert mutated, "the step writes the KV cache: some input must be mutated"
        assert mutated <= static, f"mutated inputs that are not static: {sorted(mutated - static)}"


def test_the_check_fails_without_static_marks(model, monkeypatch):
    monkeypatch.setattr(KVCache, "mark_static", lambda self: None)
    assert any(not mutated <= static for mutated, static in traced_inputs(model, False))
