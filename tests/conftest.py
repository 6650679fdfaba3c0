"""Shared fixtures: tiny configs and deterministic seeds. Tests are hermetic and CPU-only."""
import os
import time
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two on a shared, busy machine
    (every parallel region waits for the other thread to be scheduled). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------- the server
SERVE_TEXTS = ["Hello! How can I help you today?\n", "def add(a, b):\n    return a + b\n",
               "The answer is 42.\n", "for i in range(10):\n    print(i)\n"] * 20


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory):
    """A tiny random-weight model with an MTP head and a BPE tokenizer, saved as a checkpoint
    directory: (dir, model, tokenizer)."""
    from mellum2 import Mellum2, ModelConfig
    from mellum2.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("serve") / "tiny"
    tok = train_bpe(SERVE_TEXTS, 320)
    g = torch.random.get_rng_state()
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("test-small", vocab_size=320, max_position_embeddings=1024, eos_token_id=28)
    m = Mellum2(cfg).eval()
    torch.random.set_rng_state(g)
    m.save_pretrained(d)
    tok.save(d)
    return d, m, tok


@pytest.fixture
def make_server(serve_model):
    """make_server(**make_state options) -> a started ThreadedServer (`.url`, `.state`) on a random
    port of 127.0.0.1, closed after the test."""
    from mellum2.serve.app import build_app
    from mellum2.serve.server import ThreadedServer, make_state

    open_ = []

    def make(**kw):
        _, m, tok = serve_model
        kw.setdefault("name", "tiny")
        state = make_state(m, tok, **kw)
        srv = ThreadedServer(build_app(state)).__enter__()
        srv.state = state
        open_.append(srv)
        return srv

    yield make
    for srv in open_:
        srv.__exit__(None, None, None)
        srv.state.backend.close()


class _ScriptedEngine:
    """Answers every request with the tokens of `text`, a few per step (the Engine.stream shape)."""

    def __init__(self, tok, text, delay: float = 0.0):
        self.tok, self.text, self.prompts, self.delay = tok, text, [], delay
        self.has_mtp = False

    def stream(self, prompts, params, speculative=False, draft_tokens=1, detokenize=None):
        self.prompts += prompts
        toks, delay = self.tok.encode(self.text), self.delay

        class Gen:
            results = [SimpleNamespace(tokens=[], top_logprobs=None, finish_reason=None) for _ in prompts]
            stats = SimpleNamespace(drafted=0, accepted=0)

            def __iter__(self):
                for a in range(0, len(toks), 3):
                    time.sleep(delay)
                    for b, p in enumerate(params):
                        piece = toks[a:a + 3]
                        end = a + 3 >= len(toks) or any(t in p.stop_token_ids for t in piece)
                        if end:
                            cut = next((k + 1 for k, t in enumerate(piece) if t in p.stop_token_ids), len(piece))
                            piece = piece[:cut]
                        self.results[b].tokens += piece
                        yield SimpleNamespace(row=b, tokens=piece, logprobs=None, finish_reason="stop" if end else None)
                    if end:
                        return
        return Gen()


@pytest.fixture
def scripted_engine():
    """A stand-in engine that answers every request with the tokens of a fixed text (tool calls and
    reasoning, which a random model never writes; or a reply slow enough to stop):
    scripted_engine(tokenizer, text, delay=seconds per step)."""
    return _ScriptedEngine
