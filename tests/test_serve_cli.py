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
