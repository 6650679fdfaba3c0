"""Where things are: the model directory of a checkpoint or training run, the tokenizer that goes
with it, its draft vocabulary, and the default cache and data directories.

Paths only: nothing here loads a model or a tokenizer, so every layer (model, data, train, infer,
eval) can import it. A missing thing raises `NotFoundError` naming where it looked; `flag` (e.g.
"--model") puts the option the path came from at the front of the message.

    run directory (mellum2 train --out OUT)       checkpoint directory
      OUT/tokenizer/                                DIR/config.json + safetensors
      OUT/checkpoints/step_00000240/model/          DIR/tokenizer/ or DIR/tokenizer.json (optional)
                                                    DIR/draft_vocab.json (optional, mellum2 train-mtp)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mellum2.errors import MellumError, NotFoundError

DRAFT_VOCAB_FILE = "draft_vocab.json"  # written by `mellum2 train-mtp`
TOKENIZER_FILE = "tokenizer.json"


class DraftVocabError(MellumError, ValueError):
    """A draft_vocab.json that is not {"ids": [token ids]}."""


def _where(flag: str | None, path) -> str:
    return f"{flag} {path}" if flag else str(path)


def default_cache_dir() -> Path:
    """$MELLUM2_CACHE, default ~/.cache/mellum2."""
    return Path(os.environ.get("MELLUM2_CACHE") or Path.home() / ".cache" / "mellum2").expanduser()


def default_data_dir() -> Path:
    """Where `mellum2 data prepare` puts the embedded corpus: $MELLUM2_CACHE/data/default."""
    return default_cache_dir() / "data" / "default"


def resolve_model_dir(path, flag: str | None = None) -> Path:
    """A checkpoint directory, or a training run directory whose newest checkpoint holds model/."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    ckpts = sorted((p / "checkpoints").glob("step_[0-9]*")) if (p / "checkpoints").is_dir() else []
    for c in reversed(ckpts):
        if (c / "model" / "config.json").is_file():
            return c / "model"
    raise NotFoundError(f"{_where(flag, path)}: no config.json there, in {path}/model or in "
                        f"{path}/checkpoints/step_*/model (expected a checkpoint directory or a training run "
                        f"directory)")


def tokenizer_dir(model_dir=None, explicit=None, flag: str = "--tokenizer") -> Path:
    """The directory holding tokenizer.json: `explicit` (or its tokenizer/) when given; else next to
    the model directory (itself or its tokenizer/), then in the tokenizer/ of its parents up to a run
    directory (OUT/checkpoints/step_N/model -> OUT/tokenizer), then the default data directory's."""
    if explicit is not None:
        for d in (Path(explicit), Path(explicit) / "tokenizer"):
            if (d / TOKENIZER_FILE).is_file():
                return d
        raise NotFoundError(f"{flag} {explicit}: no {TOKENIZER_FILE} there or in its tokenizer/")
    candidates = []
    if model_dir is not None:
        m = Path(model_dir)
        candidates += [m, m / "tokenizer"] + [d / "tokenizer" for d in m.parents[:4]]
    candidates.append(default_data_dir() / "tokenizer")
    for c in candidates:
        if (c / TOKENIZER_FILE).is_file():
            return c
    near = f"next to {model_dir}, in its parents or " if model_dir is not None else ""
    raise NotFoundError(f"no {TOKENIZER_FILE} {near}in the default data directory ({default_data_dir()}); "
                        f"pass {flag} DIR or run `mellum2 data prepare`")


def draft_vocab(model_dir) -> list[int] | None:
    """The draft vocabulary `mellum2 train-mtp` stored next to the weights (draft_vocab.json), or None."""
    f = Path(model_dir) / DRAFT_VOCAB_FILE
    if not f.is_file():
        return None
    try:
        ids = [int(i) for i in json.loads(f.read_text())["ids"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DraftVocabError(f"{f}: malformed draft vocabulary ({e}); expected {{\"ids\": [...]}}") from None
    return ids
