"""The engine on CUDA (skipped without a GPU): same greedy tokens as on the CPU (fp32), the compiled /
CUDA-graph decode step equals eager, speculative greedy (eager and as one CUDA graph per step)
equals plain greedy, the decode step has no host syncs."""
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.infer import Engine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 9, 11], list(range(20, 37)), [7] * 9]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cpu = Mellum2(ModelConfig.from_preset("test-small2")).eval()
    gpu = Mellum2(ModelConfig.from_preset("test-small2")).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


def test_cuda_greedy_equals_cpu(models):
    cpu, gpu = models
    p = SamplingParams(max_new_tokens=20, ignore_eos=True)
    want = [r.tokens for r in Engine(cpu).generate(PROMPTS, p)]
    assert [r.tokens for r in Engine(gpu).generate(PROMPTS, p)] == want
    assert [r.tokens for r in Engine(gpu).generate(PROMPTS, p, speculative=True, draft_tokens=2)] == want


@pytest.mark.parametrize("spec", [{}, {"speculative": True, "draft_tokens": 2}])
def test_cuda_graph_steps_equal_eager_greedy(models, spec):
    """The plain decode step and the greedy speculative step, each a CUDA graph, reused twice."""
    _, gpu = models
    p = SamplingParams(max_new_tokens=20, ignore_eos=True)
    want = [r.tokens for r in Engine(gpu).generate(PROMPTS, p)]
    eng = Engine(gpu, compile=True)
    for _ in range(2):
        assert [r.tokens for r in eng.generate(PROMPTS, p, **spec)] == want


def test_decode_step_does_not_sync(models):
    """The fast path with the gather MoE runs a decode step without a device->host copy."""
    from mellum2.infer.forward import Fast
    from mellum2.infer.kvcache import KVCache

    _, gpu = models
    fwd = Fast(gpu, moe="gather")
    cache = KVCache(gpu.cfg, 2, 64, device="cuda")
    ids, pos = torch.tensor([[3], [4]], device="cuda"), torch.tensor([[0], [0]], device="cuda")
    fwd.head(fwd.trunk(ids, pos, cache))
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd.head(fwd.trunk(ids, pos + 1, cache)).argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
