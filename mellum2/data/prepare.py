"""`mellum2 data prepare`: sources -> filters -> dedup -> decontamination -> tokens -> shards.

A linear recipe in two streaming passes, so memory holds dedup signatures, never the corpus:

  pass 1  read every source; text filters (filters.py), exact and MinHash near-dedup per domain
          (dedup.py), HumanEval decontamination (decontam.py); survivors go to a spool file
  train   if no tokenizer is given: byte-level BPE on the spool (up to `tokenizer_train_mb`, split
          evenly over domains, 1 in 50 documents held out to measure bytes per token)
  pass 2  tokenize the spool in batches (Rust, all cores; corpus text is encoded with
          allow_special=False), drop low-diversity documents, append to per-domain shards

Then the index is written (last, atomically: see shards.py), `stats.json` saved and a summary printed:
what each stage removed per domain, documents/tokens/bytes per token per domain, what a budget asks
of each domain in each phase, and best-fit vs greedy split rates. Output defaults to
`default_data_dir()`: `$MELLUM2_CACHE/data/default` (`~/.cache/mellum2/data/default`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from mellum2 import atomic
from mellum2.errors import DiskError, MellumError, describe_os_error
from mellum2.locate import default_data_dir

from ..tokenizer import Tokenizer, bytes_per_token, train_bpe
from .curriculum import DEFAULT_PHASES, MAX_REPEATS, plan
from .decontam import Decontaminator
from .dedup import ExactDedup, NearDedup, content_key
from .filters import FilterConfig, low_diversity, text_reason
from .packing import pack_best_fit, pack_greedy
from .shards import INDEX, ShardWriter, token_dtype, write_index
from .sources import DOMAINS, Document, iter_source

STATS = "stats.json"


class PrepareError(MellumError, RuntimeError):
    """Prepare cannot produce a dataset (no documents, a bad tokenizer, ...); the message says why."""


def ensure_default_data(progress: bool = True) -> Path:
    """The default prepared directory, preparing the embedded corpus first if it is not complete.
    Safe to call from every rank at once: an exclusive file lock lets one process prepare while the
    others wait and then find the index."""
    import fcntl  # Unix only (the lock), so imported where it is used

    out = default_data_dir()
    if (out / INDEX).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / INDEX).is_file():
                prepare(out=out, progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def _pass1(sources: Sequence[str], spool: Path, cfg: FilterConfig, decontam: Decontaminator | None,
           near: bool, seed: int, scale: float, text_field: str, split: str, progress: bool,
           removed: dict, docs_in: Counter, bytes_in: Counter) -> Counter:
    exact = {d: ExactDedup() for d in DOMAINS}
    nears = {d: NearDedup(seed=seed) for d in DOMAINS}
    kept = Counter()
    with open(spool, "w", encoding="utf-8") as f:
        for spec in sources:
            docs = iter_source(spec, text_field=text_field, split=split, embedded_scale=scale, progress=progress)
            for doc in tqdm(docs, desc=f"read+filter {spec}", unit=" docs", disable=not progress):
                d = doc.domain
                docs_in[d] += 1
                bytes_in[d] += len(doc.text.encode("utf-8", "replace"))
                reason = text_reason(doc, cfg)
                if reason is None and exact[d].seen(doc.text):
                    reason = "exact_dup"
                if reason is None and near and nears[d].seen(doc.text):
                    reason = "near_dup"
                if reason is None and decontam is not None and decontam.contaminated(doc.text):
                    reason = f"decontam_{decontam.name}"
                if reason:
                    removed[reason][d] += 1
                    continue
                kept[d] += 1
                f.write(json.dumps({"text": doc.text, **doc.meta()}, ensure_ascii=False) + "\n")
    return kept


def _read_spool(spool: Path) -> Iterator[Document]:
    with open(spool, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            yield Document(r["text"], r["domain"], r["lang"], r["source"], r["group"])


def _train_tokenizer(spool: Path, kept: Counter, vocab_size: int, train_mb: float, progress: bool):
    """BPE on up to train_mb of the spool, evenly per domain; returns (tokenizer, held-out texts)."""
    cap = train_mb * (1 << 20) / max(len(kept), 1)
    used, held = Counter(), defaultdict(list)

    def texts():
        for doc in _read_spool(spool):
            if content_key(doc.text)[0] % 50 == 0:
                if sum(map(len, held[doc.domain])) < 2 << 20:
                    held[doc.domain].append(doc.text)
            elif used[doc.domain] < cap:
                used[doc.domain] += len(doc.text)
                yield doc.text

    tok = train_bpe(texts(), vocab_size, show_progress=progress)
    return tok, held


def prepare(sources: Sequence[str] = ("embedded",), out: str | Path | None = None,
            tokenizer: str | Path | None = None, vocab_size: int = 8192, seed: int = 0, scale: float = 1.0,
            decontaminate: bool = True, near_dedup: bool = True, text_field: str = "text",
            split: str = "train", filters: FilterConfig | None = None, tokenizer_train_mb: float = 48.0,
            shard_tokens: int = 64 << 20, budget: int | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> dict:
    """Build a prepared data directory at `out` from `sources`; returns (and saves) the stats."""
    t0 = time.time()
    out = Path(out) if out is not None else default_data_dir()
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a directory")
    if not sources:
        raise PrepareError("no sources given")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiskError(f"--out {out}: cannot create it ({describe_os_error(e)})") from None
    (out / INDEX).unlink(missing_ok=True)  # from here on the directory reads as incomplete
    shutil.rmtree(out / "shards", ignore_errors=True)
    cfg = filters or FilterConfig()
    decontam = Decontaminator.humaneval() if decontaminate else None
    removed: dict[str, Counter] = defaultdict(Counter)
    docs_in, bytes_in = Counter(), Counter()
    spool = out / f".spool-{os.getpid()}.jsonl"
    try:
        kept = _pass1(sources, spool, cfg, decontam, near_dedup, seed, scale, text_field, split, progress,
                      removed, docs_in, bytes_in)
        if not docs_in:
            raise PrepareError(f"sources {list(sources)} yielded no documents")
        if not kept:
            raise PrepareError(f"every one of {sum(docs_in.values())} documents was filtered out: "
                               f"{ {k: dict(v) for k, v in removed.items()} }")
        t1 = time.time()
        held: dict[str, list[str]] = {}
        if tokenizer is None:
            log(f"training a {vocab_size}-entry byte-level BPE on the filtered corpus ...")
            tok, held = _train_tokenizer(spool, kept, vocab_size, tokenizer_train_mb, progress)
        else:
            tok = Tokenizer.load(tokenizer)
        tok.save(out / "tokenizer")
        t2 = time.time()
        dtype = token_dtype(tok.vocab_size)
        writers = {d: ShardWriter(out, d, dtype, shard_tokens) for d in kept}
        lens: dict[str, list[int]] = defaultdict(list)
        stored_bytes = Counter()
        batch: list[Document] = []

        def flush():
            for doc, ids in zip(batch, tok.encode_batch([b.text for b in batch], allow_special=False)):
                arr = np.asarray(ids, dtype=np.int64)
                if len(arr) == 0 or low_diversity(arr, cfg):
                    removed["low_diversity"][doc.domain] += 1
                    continue
                writers[doc.domain].add(arr, doc.meta())
                lens[doc.domain].append(len(arr))
                stored_bytes[doc.domain] += len(doc.text.encode("utf-8"))
            batch.clear()

        for doc in tqdm(_read_spool(spool), total=sum(kept.values()), desc="tokenize", unit=" docs",
                        disable=not progress):
            batch.append(doc)
            if len(batch) >= 256:
                flush()
        flush()
        shards = [s for w in writers.values() for s in w.close()]
        if not shards:
            raise PrepareError("every document was removed by the low-diversity filter")
    finally:
        spool.unlink(missing_ok=True)
    t3 = time.time()
    stats = _stats(sources, docs_in, bytes_in, removed, lens, stored_bytes, tok, held, budget, seed,
                   {"filter_dedup_s": t1 - t0, "tokenizer_s": t2 - t1, "tokenize_write_s": t3 - t2})
    atomic.write_text(out / STATS, json.dumps(stats, indent=1))
    write_index(out, shards, dtype, tok.vocab_size, tok.special_ids,
                extra={"created_by": "mellum2 data prepare", "sources": list(sources), "seed": seed})
    stats["timing"]["total_s"] = time.time() - t0
    atomic.write_text(out / STATS, json.dumps(stats, indent=1))
    log(summary(stats))
    log(f"prepared {out} in {stats['timing']['total_s']:.1f} s")
    return stats


def _stats(sources, docs_in, bytes_in, removed, lens, stored_bytes, tok, held, budget, seed, timing) -> dict:
    tokens = {d: int(sum(v)) for d, v in lens.items()}
    domains = {d: {"docs_in": docs_in[d], "mb_in": bytes_in[d] / 1e6, "docs": len(lens.get(d, [])),
                   "tokens": tokens.get(d, 0), "mb": stored_bytes[d] / 1e6,
                   "bytes_per_token": stored_bytes[d] / max(tokens.get(d, 0), 1)}
               for d in DOMAINS if docs_in[d]}
    budget = budget or max(sum(tokens.values()), 1)
    all_lens = [n for d in DOMAINS for n in lens.get(d, [])]
    packing = {}
    for T in (512, 2048, 8192):
        bf, gr = pack_best_fit(all_lens, T, max_piece=T - 5), pack_greedy(all_lens, T)
        packing[str(T)] = {"best_fit_split": bf.split_rate, "greedy_split": gr.split_rate,
                           "best_fit_pad": bf.pad_fraction}
    return {
        "sources": list(sources), "seed": seed, "vocab_size": tok.vocab_size, "domains": domains,
        "removed": {k: dict(v) for k, v in removed.items()},
        "heldout_bytes_per_token": {d: bytes_per_token(tok, t) for d, t in held.items() if t},
        "budget": budget, "max_repeats": MAX_REPEATS,
        "plan": plan(budget, tokens, DEFAULT_PHASES, MAX_REPEATS), "packing": packing, "timing": timing,
    }


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:,.3f}" if isinstance(c, float) else f"{c:,}" if isinstance(c, int) else str(c)
                         for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * x for x in w), *lines[1:]])


def summary(stats: dict) -> str:
    """The tables `mellum2 data prepare` and `mellum2 data info` print."""
    doms = list(stats["domains"])
    parts = ["documents removed per stage:",
             _table(["stage"] + doms, [[k] + [v.get(d, 0) for d in doms] for k, v in stats["removed"].items()]
                    or [["(none)"] + [0] * len(doms)])]
    rows = [[d, s["docs_in"], s["docs"], s["tokens"], s["mb"], s["bytes_per_token"]] for d, s in stats["domains"].items()]
    tot_tok = sum(s["tokens"] for s in stats["domains"].values())
    tot_mb = sum(s["mb"] for s in stats["domains"].values())
    rows.append(["all", sum(s["docs_in"] for s in stats["domains"].values()),
                 sum(s["docs"] for s in stats["domains"].values()), tot_tok, tot_mb, tot_mb * 1e6 / max(tot_tok, 1)])
    parts += ["", f"stored (vocab {stats['vocab_size']}):",
              _table(["domain", "docs in", "docs kept", "tokens", "MB", "bytes/token"], rows)]
    if stats.get("heldout_bytes_per_token"):
        parts += ["", "tokenizer bytes/token on held-out documents: " +
                  ", ".join(f"{d} {v:.2f}" for d, v in stats["heldout_bytes_per_token"].items())]
    present = [d for d in DOMAINS if d in stats["plan"][0]["demand"]]
    prow = [[p["phase"], int(p["tokens"])] + [int(p["demand"][d]) for d in present] +
            [" ".join(f"{p['epochs'][d]:.2f}" for d in present)] for p in stats["plan"]]
    parts += ["", f"curriculum for a budget of {stats['budget']:,} tokens (tokens per domain; cumulative "
              f"epochs {'/'.join(present)}; cap {stats['max_repeats']}):",
              _table(["phase", "tokens"] + present + ["epochs"], prow)]
    parts += ["", "documents split across rows (best-fit vs greedy concatenation):",
              _table(["seq_len", "best-fit", "greedy", "best-fit pad"],
                     [[T, f"{v['best_fit_split']:.2%}", f"{v['greedy_split']:.2%}", f"{v['best_fit_pad']:.2%}"]
                      for T, v in stats["packing"].items()])]
    return "\n".join(parts)
