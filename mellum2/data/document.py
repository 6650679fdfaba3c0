"""What the data pipeline passes around: a `Document` (text + domain, language, origin, group), the
three domains of Mellum 2's mixture, and the reading of one text file. Shared by the sources
(sources.py) and the embedded corpus (embedded.py), which sources.py reads as one of its sources.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("web", "code", "math")
MAX_FILE_BYTES = 4 << 20  # larger files are skipped when walking directories (data dumps, not code)


@dataclass
class Document:
    text: str
    domain: str  # one of DOMAINS
    lang: str = ""  # language of a code document ("python", "c", ...), "" otherwise
    source: str = ""  # file path, or "table.jsonl:row", or "hf:name:row"
    group: str = ""  # package / directory / repository the document belongs to

    def meta(self) -> dict:
        return {"domain": self.domain, "lang": self.lang, "source": self.source, "group": self.group}


def read_text_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> str | None:
    """UTF-8 text of a file, or None if it is too large, binary (NUL bytes) or not valid UTF-8."""
    try:
        if path.stat().st_size > max_bytes:
            return None
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
