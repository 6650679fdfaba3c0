"""`mellum2 serve` on the command line: bad flags are one-line usage errors naming the flag, the
default bind address is 127.0.0.1, and the stage is in the dispatcher."""
from __future__ import annotations

import pytest

from mellum2 import cli as dispatcher
from mellum2.errors import MellumError
from mellum2.serve import cli


def test_defaults_bind_to_localhost():
    args = cli.build_parser().parse_args(["--model", "x"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.batching == "continuous"
    assert "serve" in dispatcher.STAGES


@pytest.mark.parametrize("flags,word", [(["--max-num-seqs", "0"], "--max-num-seqs"),
                                        (["--draft-tokens", "0"], "--draft-tokens"),
                                        (["--max-model-len", "99999"], "max_model_len"),
                                        (["--prefill-chunk", "0"], "--prefill-chunk")])
def test_bad_flags_are_usage_errors(serve_model, flags, word):
    d, _, _ = serve_model
    with pytest.raises(MellumError, match=word):
        cli.main(["--model", str(d), *flags])


def test_missing_model_dir(tmp_path):
    with pytest.raises(MellumError, match="--model"):
        cli.main(["--model", str(tmp_path / "nope")])


def test_tokens_per_second_gauge_is_the_windows_sum(monkeypatch):
    """The gauge counts the tokens of the last WINDOW_S seconds, kept as a running sum."""
    from mellum2.serve import metrics as mod
    now = [100.0]
    monkeypatch.setattr(mod.time, "perf_counter", lambda: now[0])
    m = mod.Metrics()
    for t, n in [(100.0, 3), (101.0, 5), (105.0, 2), (111.5, 4)]:  # at 111.5 the first two fall out
        now[0] = t
        m.tokens(n)
    assert m.tps._value.get() == (2 + 4) / mod.WINDOW_S
    now[0] = 130.0
    m.render()
    assert m.tps._value.get() == 0.0 and m._window.total == 0


def test_window_keeps_its_total_through_expiry_and_the_item_cap():
    from mellum2.infer.window import Window
    w = Window(10.0, max_items=3)
    for t, n in [(0.0, 1), (1.0, 2), (2.0, 4), (3.0, 8)]:  # the 4th add drops the oldest (the cap)
        w.add(t, n)
    assert w.total == 2 + 4 + 8 == sum(n for _, n in w.items)
    w.expire(11.5)  # drops the items before 1.5
    assert w.total == 4 + 8 and len(w.items) == 2
