"""MTP self-speculation on held-out code: draft acceptance, mean accepted length, and decode speed
plain vs speculative (greedy, one request at a time as an IDE sends them).

Prompts: the first `prompt_tokens` tokens of held-out files (common.heldout_files), after
`<|endoftext|>`; each is decoded `new_tokens` further, plainly and with the MTP head drafting
`draft_tokens` tokens per step. Acceptance = accepted / drafted drafts; mean accepted length = tokens
emitted per trunk pass (1 + accepted drafts per verify step), the figure that bounds the speed-up.
Greedy speculative output must equal plain greedy output; `identical` says whether it did.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from mellum2.infer.api import make_params
from mellum2.infer.engine import Engine

from .common import heldout_files, progress


def run(model, tok, n_files: int = 8, prompt_tokens: int = 128, new_tokens: int = 64, draft_tokens: int = 1,
        compile: bool = False, files: Sequence[Path] | None = None, root=None, quiet: bool = False) -> dict:
    files = list(files) if files is not None else heldout_files(n_files, root=root)
    if model.mtp is None:
        return {"available": False, "reason": "the checkpoint has no MTP head"}
    eng = Engine(model, compile=compile)
    stop = [t for t in (tok.eot_id, tok.eos_id) if t is not None]
    params = make_params(new_tokens, stop=stop)
    tot = {"drafted": 0, "accepted": 0, "verify_rows": 0, "plain_s": 0.0, "spec_s": 0.0, "plain_tokens": 0,
           "spec_tokens": 0, "identical": True}
    if compile:  # compile both steps before timing (one throwaway call each)
        warm = [[tok.bos_id] + list(tok.encode("def f(x):\n", allow_special=False))]
        eng.generate(warm, params)
        eng.generate(warm, params, speculative=True, draft_tokens=draft_tokens)
    for f in progress(files, "mtp", quiet=quiet):
        ids = [tok.bos_id] + list(tok.encode(Path(f).read_text(encoding="utf-8"), allow_special=False))[:prompt_tokens]
        t0 = time.perf_counter()
        plain = eng.generate([ids], params)[0]
        t1 = time.perf_counter()
        spec = eng.generate([ids], params, speculative=True, draft_tokens=draft_tokens)[0]
        t2 = time.perf_counter()
        st = spec.stats
        tot["drafted"] += st.drafted
        tot["accepted"] += st.accepted
        tot["verify_rows"] += st.verify_rows
        tot["plain_s"] += t1 - t0
        tot["spec_s"] += t2 - t1
        tot["plain_tokens"] += len(plain.tokens)
        tot["spec_tokens"] += len(spec.tokens)
        tot["identical"] &= plain.tokens == spec.tokens
    acc = tot["accepted"] / tot["drafted"] if tot["drafted"] else 0.0
    mal = (tot["accepted"] + tot["verify_rows"]) / tot["verify_rows"] if tot["verify_rows"] else 1.0
    return {"available": True, "files": len(files), "draft_tokens": draft_tokens, "compile": compile,
            "acceptance": acc, "mean_accepted_length": mal,
            "plain_tokens_per_s": tot["plain_tokens"] / tot["plain_s"] if tot["plain_s"] else 0.0,
            "spec_tokens_per_s": tot["spec_tokens"] / tot["spec_s"] if tot["spec_s"] else 0.0,
            "speedup": tot["plain_s"] / tot["spec_s"] if tot["spec_s"] else 0.0, **tot}
