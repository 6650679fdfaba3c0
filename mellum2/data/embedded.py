"""The embedded default corpus: built from what every machine already has, with no network.

Composition (caps at scale 1.0, in MB of UTF-8 text before filtering; each part is skipped when the
directory is absent, so the corpus differs a little between machines - see `docs/data.md`):

  code  python   the running interpreter's standard library (`sysconfig` stdlib, site-packages
                 excluded): library modules first, then its test suite, up to 20 MB
        c        C headers under /usr/include, up to 4 MB
        perl     Perl modules under /usr/share/perl*, up to 3 MB
  web   docstrings  module/class/function docstrings of the stdlib (one document per module), 4 MB
        pydoc    the language reference topics shipped in `pydoc_data.topics`
        licenses /usr/share/common-licenses and every package's /usr/share/doc/*/copyright, 2 MB
        docs     README/NEWS/*.txt/*.md/*.rst/*.html under /usr/share/doc (gz-decompressed,
                 HTML tags stripped), 6 MB
        man      English manual pages /usr/share/man/man[1-8], troff markup stripped to text, 12 MB
  math  mathgen  generated worksheets of worked problems (mathgen.py), 8 MB, deterministic from seed

Where a part is capped, files are taken in a stable pseudo-random order (a hash of the path relative
to its root) so the cap keeps a spread of packages instead of the alphabet's first letters.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import html
import re
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from . import mathgen
from .document import DOMAINS, Document, read_text_file

MB = 1 << 20
CAPS_MB = {  # part -> MB at scale 1.0
    "python": 20, "c": 4, "perl": 3,
    "docstrings": 4, "pydoc": 2, "licenses": 2, "docs": 6, "man": 12,
    "math": 8,
}
MAN_SECTIONS = tuple(f"man{i}" for i in range(1, 9))


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _order(paths: Iterable[Path], root: Path) -> list[Path]:
    """Stable pseudo-random order: by blake2b of the path relative to `root`."""
    return sorted(paths, key=lambda p: hashlib.blake2b(str(p.relative_to(root)).encode(), digest_size=8).digest())


def _capped(docs: Iterator[Document], cap_bytes: float) -> Iterator[Document]:
    total = 0
    for doc in docs:
        if total >= cap_bytes:
            return
        total += len(doc.text.encode("utf-8"))
        yield doc


# ---------------------------------------------------------------------- code
def _stdlib_files() -> list[Path]:
    root = stdlib_dir()
    if not root.is_dir():
        return []
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    is_test = lambda p: any(part in ("test", "tests", "idle_test") for part in p.relative_to(root).parts)
    lib, tests = [p for p in files if not is_test(p)], [p for p in files if is_test(p)]
    return sorted(lib) + _order(tests, root)


def _package(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return f"{root.name}/{rel.parts[0] if len(rel.parts) > 1 else rel.stem}"


def iter_python() -> Iterator[Document]:
    root = stdlib_dir()
    for path in _stdlib_files():
        text = read_text_file(path)
        if text is not None:
            yield Document(text, "code", "python", str(path), _package(path, root))


def _iter_tree(roots: Iterable[str], exts: tuple[str, ...], domain: str, lang: str) -> Iterator[Document]:
    for r in roots:
        root = Path(r)
        if not root.is_dir():
            continue
        files = [p for p in root.rglob("*") if p.suffix in exts and p.is_file() and not p.is_symlink()]
        for path in _order(files, root):
            text = read_text_file(path)
            if text is not None:
                yield Document(text, domain, lang, str(path), _package(path, root))


def iter_c() -> Iterator[Document]:
    return _iter_tree(["/usr/include"], (".h",), "code", "c")


def iter_perl() -> Iterator[Document]:
    return _iter_tree(sorted(str(p) for p in Path("/usr/share").glob("perl*")), (".pm", ".pl"), "code", "perl")


# ---------------------------------------------------------------------- web
def docstrings_of(source: str, name: str) -> str | None:
    """Module, class and function docstrings of Python `source`, as one prose document."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                title = name if isinstance(node, ast.Module) else f"{name}.{node.name}"
                parts.append(f"{title}\n\n{doc.strip()}")
    return "\n\n".join(parts) + "\n" if parts else None


def iter_docstrings() -> Iterator[Document]:
    root = stdlib_dir()
    for path in _stdlib_files():
        rel = path.relative_to(root)
        if any(p in ("test", "tests", "idle_test") for p in rel.parts):
            continue
        text = read_text_file(path)
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        doc = docstrings_of(text, name) if text else None
        if doc:
            yield Document(doc, "web", "", f"{path}#docstrings", _package(path, root))


def iter_pydoc() -> Iterator[Document]:
    try:  # large (the whole language reference as one dict), and missing from some minimal Pythons
        from pydoc_data.topics import topics
    except ImportError:
        return
    for key in sorted(topics):
        yield Document(topics[key], "web", "", f"pydoc_data.topics:{key}", "pydoc")


def _read_maybe_gz(path: Path) -> str | None:
    if path.suffix != ".gz":
        return read_text_file(path)
    try:
        if path.stat().st_size > 2 * MB:
            return None
        raw = gzip.decompress(path.read_bytes())
        return raw.decode("utf-8") if b"\x00" not in raw[:8192] else None
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
        return None


def iter_licenses() -> Iterator[Document]:
    for root, pattern in (("/usr/share/common-licenses", "*"), ("/usr/share/doc", "*/copyright")):
        base = Path(root)
        if not base.is_dir():
            continue
        for path in _order((p for p in base.glob(pattern) if p.is_file() and not p.is_symlink()), base):
            text = read_text_file(path)
            if text:
                yield Document(text, "web", "", str(path), f"licenses/{path.relative_to(base).parts[0]}")


_TAGS = re.compile(r"<(script|style)\b.*?</\1>|<[^>]+>", re.S | re.I)
_BLANKS = re.compile(r"\n[ \t]*(\n[ \t]*)+")


def html_to_text(text: str) -> str:
    return _BLANKS.sub("\n\n", html.unescape(_TAGS.sub("", text))).strip() + "\n"


def iter_docs() -> Iterator[Document]:
    base = Path("/usr/share/doc")
    if not base.is_dir():
        return
    keep = re.compile(r"^(README|NEWS|FAQ|TODO|AUTHORS|HACKING|USAGE)([.-].*)?$|.*\.(txt|md|rst|html?)(\.gz)?$", re.I)
    files = [p for p in base.rglob("*") if keep.match(p.name) and p.is_file() and not p.is_symlink()]
    for path in _order(files, base):
        text = _read_maybe_gz(path)
        if not text:
            continue
        if ".htm" in path.name.lower():
            text = html_to_text(text)
        yield Document(text, "web", "", str(path), f"doc/{path.relative_to(base).parts[0]}")


_MAN_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_MAN_ESC = {r"\-": "-", r"\(em": "--", r"\(en": "-", r"\(bu": "*", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"',
            r"\(rq": '"', r"\(oq": "'", r"\(cq": "'", r"\e": "\\", r"\&": "", r"\|": "", r"\^": "", r"\~": " ",
            r"\ ": " ", r"\(co": "(c)", r"\(mu": "x", r"\(<=": "<=", r"\(>=": ">="}
_MAN_OTHER_ESC = re.compile(r"\\(\*\(..|\*.|\(..|\[[^\]]*\]|[a-zA-Z]\[[^\]]*\]|[a-zA-Z]'[^']*'|.)")
_MAN_TEXT_MACROS = {".B", ".I", ".BR", ".RB", ".BI", ".IB", ".IR", ".RI", ".SM", ".SB"}


def man_to_text(troff: str) -> str:
    """Plain text of a troff/man page: headings kept, font and spacing requests dropped (roughly)."""
    out = []
    for line in troff.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line.partition(" ")
            if macro in (".SH", ".SS"):
                out.append("\n" + rest.strip('"').upper() if macro == ".SH" else "\n" + rest.strip('"'))
            elif macro in _MAN_TEXT_MACROS:
                words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', rest)]
                # .B/.I set their words in one font; .BR/.IR/... alternate fonts with no space between
                out.append((" " if macro in (".B", ".I", ".SM", ".SB") else "").join(words))
            elif macro in (".PP", ".P", ".LP", ".sp", ".br", ".TP", ".IP", ".HP"):
                out.append("" if macro != ".IP" else rest.split('"')[1] if '"' in rest else "")
            continue
        out.append(line)
    text = "\n".join(out)
    text = _MAN_FONT.sub("", text)
    for esc, rep in _MAN_ESC.items():
        text = text.replace(esc, rep)
    text = _MAN_OTHER_ESC.sub("", text)
    return _BLANKS.sub("\n\n", text).strip() + "\n"


def iter_man() -> Iterator[Document]:
    base = Path("/usr/share/man")
    if not base.is_dir():
        return
    files = [p for s in MAN_SECTIONS if (base / s).is_dir() for p in (base / s).iterdir()
             if p.is_file() and not p.is_symlink()]
    for path in _order(files, base):
        troff = _read_maybe_gz(path)
        if not troff or troff.lstrip().startswith(".so "):  # `.so` pages only point to another page
            continue
        text = man_to_text(troff)
        if len(text) > 200:
            yield Document(text, "web", "", str(path), f"man/{path.parent.name}")


# ---------------------------------------------------------------------- math
def iter_math(seed: int = 0, max_bytes: float = CAPS_MB["math"] * MB) -> Iterator[Document]:
    for i, text in mathgen.generate(seed, int(max_bytes)):
        yield Document(text, "math", "", f"mathgen:{seed}:{i}", f"mathgen/{i // 1000}")


# ---------------------------------------------------------------------- all
PARTS: dict[str, tuple[str, Callable[[], Iterator[Document]]]] = {
    "python": ("code", iter_python), "c": ("code", iter_c), "perl": ("code", iter_perl),
    "docstrings": ("web", iter_docstrings), "pydoc": ("web", iter_pydoc), "licenses": ("web", iter_licenses),
    "docs": ("web", iter_docs), "man": ("web", iter_man),
}


def iter_embedded(domains: Iterable[str] = DOMAINS, scale: float = 1.0, seed: int = 0,
                  progress: bool = False) -> Iterator[Document]:
    """Every document of the embedded corpus for `domains`, each part capped at CAPS_MB x scale."""
    domains = tuple(domains)
    bad = [d for d in domains if d not in DOMAINS]
    if bad or not domains:
        raise ValueError(f"iter_embedded: domains must be a non-empty subset of {DOMAINS}, got {domains}")
    if not scale > 0:
        raise ValueError(f"iter_embedded: scale must be > 0, got {scale}")
    for part, (domain, fn) in PARTS.items():
        if domain in domains:
            docs = _capped(fn(), CAPS_MB[part] * MB * scale)
            yield from tqdm(docs, desc=f"embedded {domain}/{part}", unit=" docs", disable=not progress,
                            leave=False)
    if "math" in domains:
        yield from iter_math(seed, CAPS_MB["math"] * MB * scale)
