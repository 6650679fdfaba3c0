"""Document sources: local files/directories/globs, JSONL, Parquet, Hugging Face `datasets`.

Every source yields `Document`s tagged with a domain (web, code, math), a language for code, the
path or row it came from and a group (the package/directory, or a JSONL `repo` field) so a
long-context stage can rebuild repository-level samples.

A source is named by a spec string (the CLI's `--sources`):

    [DOMAIN:]PATH         a file, a directory (walked recursively) or a glob (`**` allowed);
                          *.jsonl / *.jsonl.gz / *.parquet are read as tables with a text field
    [DOMAIN:]hf:NAME[:CONFIG]   a Hugging Face dataset, streamed (optional `datasets` dependency)
    embedded[:DOMAIN]     the embedded default corpus (embedded.py), all of it or one domain

Without a DOMAIN prefix a table row's own `domain` field is used, else the file extension decides
(known source-code extensions -> code, anything else -> web). pyarrow and datasets are imported only
when such a source is read, and a missing package is a clear error.
"""
from __future__ import annotations

import glob as globlib
import gzip
import json
import os
from pathlib import Path
from typing import Iterator

from mellum2.errors import MellumError

from .document import DOMAINS, MAX_FILE_BYTES, Document, read_text_file
from .embedded import iter_embedded

# extension -> language of a code file (lower-case, with the dot)
CODE_EXTS = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp",
    ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp", ".java": "java", ".kt": "kotlin", ".js": "javascript",
    ".mjs": "javascript", ".ts": "typescript", ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php",
    ".cs": "csharp", ".swift": "swift", ".scala": "scala", ".sh": "shell", ".bash": "shell",
    ".pl": "perl", ".pm": "perl", ".lua": "lua", ".sql": "sql", ".r": "r", ".m": "objc", ".tcl": "tcl",
    ".el": "lisp", ".lisp": "lisp", ".hs": "haskell", ".ml": "ocaml", ".f90": "fortran", ".cmake": "cmake",
    ".awk": "awk", ".css": "css", ".html": "html", ".xml": "xml", ".toml": "toml", ".yaml": "yaml",
    ".yml": "yaml", ".json": "json",
}
TEXT_EXTS = {".txt", ".md", ".rst", ".text", ".tex", ""}
TABLE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


class SourceError(MellumError, ValueError):
    """A bad source spec, a missing path or a malformed table; the message names which."""


def language_of(path: str | Path) -> str:
    """Code language from the file extension, "" when it is not a known code extension."""
    return CODE_EXTS.get(Path(path).suffix.lower(), "")


def domain_of(path: str | Path) -> str:
    return "code" if language_of(path) else "web"


def _check_domain(domain: str | None, where: str) -> None:
    if domain is not None and domain not in DOMAINS:
        raise SourceError(f"{where}: domain must be one of {DOMAINS}, got {domain!r}")


# ---------------------------------------------------------------------- files and directories
def iter_files(root: str | Path, domain: str | None = None, pattern: str | None = None,
               exts: set[str] | None = None, max_bytes: int = MAX_FILE_BYTES) -> Iterator[Document]:
    """Documents of the files under `root` (a directory walked recursively, one file, or a glob via
    `pattern`), in sorted path order. `exts` limits which extensions are read; group = the file's
    top-level directory under `root` (its package)."""
    root = Path(root)
    if pattern is not None:
        paths = sorted(Path(p) for p in globlib.glob(pattern, recursive=True))
        base = Path(_glob_base(pattern))
    elif root.is_file():
        paths, base = [root], root.parent
    elif root.is_dir():
        paths, base = sorted(p for p in root.rglob("*")), root
    else:
        raise SourceError(f"{root}: no such file or directory")
    for path in paths:
        if not path.is_file() or path.is_symlink():
            continue
        ext = path.suffix.lower()
        if exts is not None and ext not in exts:
            continue
        if exts is None and ext not in CODE_EXTS and ext not in TEXT_EXTS:
            continue
        text = read_text_file(path, max_bytes)
        if text is None:
            continue
        rel = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
        group = f"{base.name}/{rel.parts[0]}" if len(rel.parts) > 1 else base.name
        dom = domain or domain_of(path)
        yield Document(text, dom, language_of(path) if dom == "code" else "", str(path), group)


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = [p for p in _takewhile_literal(parts)]
    return str(Path(*fixed)) if fixed else "."


def _takewhile_literal(parts):
    for p in parts:
        if any(c in p for c in "*?["):
            return
        yield p


# ---------------------------------------------------------------------- tables
def _row_doc(row: dict, where: str, domain: str | None, text_field: str) -> Document | None:
    text = row.get(text_field)
    if text is None:
        raise SourceError(f"{where}: no text field {text_field!r} (fields: {sorted(row)[:10]})")
    if not isinstance(text, str):
        raise SourceError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (legal in JSON escapes) cannot be tokenized
        text = text.encode("utf-8", "replace").decode("utf-8")
    dom = domain or row.get("domain") or "web"
    _check_domain(dom, where)
    lang = row.get("lang") or row.get("language") or ""
    src = row.get("path") or row.get("source") or where
    group = row.get("group") or row.get("repo") or row.get("repository") or ""
    return Document(text, dom, str(lang) if dom == "code" else "", str(src), str(group))


def iter_jsonl(path: str | Path, domain: str | None = None, text_field: str = "text") -> Iterator[Document]:
    """One document per line of a JSONL (optionally .gz) file: {"text": ..., ["domain", "lang", "path",
    "repo"]}. A line that is not JSON is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such JSONL file")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{i}: not a JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield _row_doc(row, f"{path}:{i}", domain, text_field)


def iter_parquet(path: str | Path, domain: str | None = None, text_field: str = "text",
                 batch_rows: int = 1024) -> Iterator[Document]:
    """Rows of a Parquet file, read in record batches (needs pyarrow: `pip install mellum2[datasets]`)."""
    try:
        import pyarrow.parquet as pq  # optional dependency (the `datasets` extra)
    except ImportError:
        raise SourceError(f"{path}: reading Parquet needs pyarrow (pip install 'mellum2[datasets]')") from None
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such Parquet file")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            i += 1
            yield _row_doc(row, f"{path}:{i}", domain, text_field)


def iter_hf(name: str, config: str | None = None, domain: str | None = None, text_field: str = "text",
            split: str = "train") -> Iterator[Document]:
    """A Hugging Face dataset, streamed (needs `datasets`: `pip install mellum2[datasets]`)."""
    try:
        import datasets  # optional dependency (the `datasets` extra)
    except ImportError:
        raise SourceError(f"hf:{name}: streaming needs the `datasets` package "
                          "(pip install 'mellum2[datasets]')") from None
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, row in enumerate(ds):
        yield _row_doc(row, f"hf:{name}:{i}", domain, text_field)


# ---------------------------------------------------------------------- specs
def parse_spec(spec: str) -> tuple[str | None, str]:
    """'code:src/' -> ('code', 'src/'); 'src/' -> (None, 'src/'); errors name the spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(f"source spec must be a non-empty string, got {spec!r}")
    head, sep, rest = spec.partition(":")
    if sep and head in DOMAINS:
        if not rest:
            raise SourceError(f"source {spec!r}: nothing after '{head}:' (expected a path or hf:NAME)")
        return head, rest
    if sep and head.lower() in ("web", "code", "math", "text", "prose"):
        raise SourceError(f"source {spec!r}: domain must be one of {DOMAINS}")
    return None, spec


def iter_source(spec: str, text_field: str = "text", split: str = "train",
                embedded_scale: float = 1.0, progress: bool = False) -> Iterator[Document]:
    """Documents of one source spec (see the module docstring)."""
    domain, target = parse_spec(spec)
    if target == "embedded" or target.startswith("embedded:"):
        part = target.partition(":")[2] or domain
        _check_domain(part or None, f"source {spec!r}")
        yield from iter_embedded(domains=(part,) if part else DOMAINS, scale=embedded_scale, progress=progress)
        return
    if target.startswith("hf:"):
        name, _, config = target[3:].partition(":")
        if not name:
            raise SourceError(f"source {spec!r}: expected hf:NAME[:CONFIG]")
        yield from iter_hf(name, config or None, domain, text_field, split)
        return
    lower = target.lower()
    if any(c in target for c in "*?["):
        if not globlib.glob(target, recursive=True):
            raise SourceError(f"source {spec!r}: the glob matches no file")
        for path in sorted(globlib.glob(target, recursive=True)):
            if path.lower().endswith(TABLE_SUFFIXES):
                yield from iter_source(f"{domain}:{path}" if domain else path, text_field, split)
        yield from iter_files(".", domain, pattern=target)
        return
    if lower.endswith((".jsonl", ".jsonl.gz")):
        yield from iter_jsonl(target, domain, text_field)
    elif lower.endswith(".parquet"):
        yield from iter_parquet(target, domain, text_field)
    elif os.path.exists(target):
        yield from iter_files(target, domain)
    else:
        raise SourceError(f"source {spec!r}: {target} does not exist (expected a file, directory, glob, "
                          "*.jsonl, *.parquet, hf:NAME or embedded)")
