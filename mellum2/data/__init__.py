"""mellum2.data: Mellum 2's pre-training data pipeline (sources, embedded corpus, filters, dedup,
decontamination, FIM, best-fit packing, three-phase curriculum, loader). See docs/data.md.

For the trainer and the demo:
    from mellum2.data import ensure_default_data      # prepares the embedded corpus once, cached
    from mellum2.data.loader import Loader
"""
from __future__ import annotations

from pathlib import Path

from mellum2.locate import default_data_dir


def ensure_default_data(progress: bool = True) -> Path:
    """The default prepared directory; runs `mellum2 data prepare` (embedded corpus) first if missing."""
    from .prepare import ensure_default_data as f  # heavy (tokenizer training, filters, numpy): on first use

    return f(progress=progress)


__all__ = ["default_data_dir", "ensure_default_data"]
