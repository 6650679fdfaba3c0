"""Rollouts for RL: G samples per prompt from the one inference engine, scored by the verifiers.

    groups = rollout(engine, tok, tasks, G=8, seed=..., max_new_tokens=128, ...)
    result = evaluate(engine, tok, heldout_tasks, max_new_tokens=128)   # greedy, mean reward + 95% CI

Sampling is the engine's batched generate (mellum2/infer/engine.py) at temperature 1 with no top-k /
top-p, so the distribution a token is drawn from is the model's own and the engine's per-token
logprobs (log-softmax of the raw logits) are pi_infer_old of the sampled tokens, what IcePop compares
with the trainer's. Every sample has its own seed (from the run's seed, the step, the prompt and the
sample index), so a step's rollouts are the same whatever batch they run in: a resumed run samples
exactly what the uninterrupted one did.

Each reply is decoded, parsed with the chat parser (reasoning, content, tool calls) and scored by
`verify.score` (reward in [0, 1]); then shaped (grpo.py): the soft overlong penalty (a reply that hit
the length cap is dropped from its group) and the concision penalty on correct replies without
reasoning. A sample whose sandbox kept failing (SandboxError) is dropped, not given 0 (a verifier
outage is not the policy's fault).
"""
from __future__ import annotations

import hashlib
import math
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mellum2.chat import parse
from mellum2.chat.template import opens_think, render
from mellum2.infer import SamplingParams
from mellum2.sandbox import SandboxError

from .grpo import concision_penalty, overlong_penalty, reflection_count
from .verify import score


@dataclass
class Sample:
    tokens: list[int]  # response tokens (the end token included when it stopped)
    logprobs: list[float]  # the sampler's logprob of each
    finished: bool  # ended with an end token (not cut by the length cap)
    text: str = ""
    score: float = 0.0  # the verifier's reward
    reason: str = ""
    reward: float = 0.0  # after shaping (the advantage's input)
    dropped: str | None = None  # why it left its group: "overlong", "verifier"
    reflections: int = 0


@dataclass
class Group:
    task: dict
    prompt: list[int]
    samples: list[Sample] = field(default_factory=list)
    version: int = 0  # optimiser steps the sampling weights had taken (staleness = step - version)

    @property
    def kept(self) -> list[Sample]:
        return [s for s in self.samples if s.dropped is None]

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.kept]


def sample_seed(seed: int, step: int, prompt: int, k: int) -> int:
    """A 62-bit seed of one sample (stable across processes, unlike hash())."""
    h = hashlib.blake2b(f"{seed}:{step}:{prompt}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def prompt_of(tok, task: dict, thinking: bool) -> tuple[list[int], bool]:
    """The prompt ids of a task and whether the prompt leaves a think span open."""
    text = render(task["messages"], task.get("tools"), add_generation_prompt=True, enable_thinking=thinking)
    return tok.encode(text), opens_think(text)


def _generate(engine, prompts: list[list[int]], params: list[SamplingParams], chunk: int, detok):
    out = []
    for a in range(0, len(prompts), chunk):
        out += engine.generate(prompts[a:a + chunk], params[a:a + chunk], detokenize=detok)
    return out


def score_reply(task: dict, text: str, think_open: bool, scorer: Callable = score) -> tuple[float, str, dict | None]:
    """(verifier reward, reason, parsed message); raises SandboxError when the sandbox keeps failing."""
    msg = parse(text, think_open=think_open)
    r, why = scorer(task, msg)
    return float(r), why, msg


def score_all(items: Sequence[tuple[dict, str, bool]], scorer: Callable = score, workers: int = 4) -> list:
    """score_reply over (task, text, think_open) items, in order; a SandboxError is returned in its
    place. Code replies are scored in a thread pool (each waits on its sandbox); the others in this
    thread (math-verify's timeout needs the main thread's SIGALRM)."""
    out: list = [None] * len(items)

    def one(j):
        try:
            out[j] = score_reply(*items[j], scorer=scorer)
        except SandboxError as e:
            out[j] = e
    code = [j for j, it in enumerate(items) if it[0].get("kind") == "code"]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(one, j) for j in code]
        for j, it in enumerate(items):
            if it[0].get("kind") != "code":
                one(j)
        for f in futures:
            f.result()
    return out


def rollout(engine, tok, tasks: Sequence[dict], G: int, *, seed: int, step: int, max_new_tokens: int,
            overlong_buffer: int, overlong_floor: float = 1.0, thinking: bool = False, chunk: int = 256,
            version: int = 0, scorer: Callable = score, workers: int = 4) -> list[Group]:
    """G samples of every task, scored and shaped (module docstring), as groups in task order."""
    if G < 2:
        raise ValueError(f"rollout: G must be >= 2 (leave-one-out needs two samples), got {G}")
    groups, prompts, params, opens = [], [], [], []
    for i, t in enumerate(tasks):
        ids, op = prompt_of(tok, t, thinking)
        groups.append(Group(t, ids, version=version))
        for k in range(G):
            prompts.append(ids)
            opens.append(op)
            params.append(SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, logprobs=True,
                                         seed=sample_seed(seed, step, i, k)))
    results = _generate(engine, prompts, params, chunk, tok.decode)
    texts = [tok.decode(r.tokens) for r in results]
    scored = score_all([(groups[j // G].task, texts[j], opens[j]) for j in range(len(results))], scorer, workers)
    for j, res in enumerate(results):
        g = groups[j // G]
        s = Sample(list(res.tokens), list(res.logprobs), res.finish_reason == "stop", texts[j])
        if isinstance(scored[j], SandboxError):
            s.dropped, s.reason, msg = "verifier", f"sandbox failed: {scored[j]}", None
        else:
            s.score, s.reason, msg = scored[j]
        pen = overlong_penalty(len(s.tokens), s.finished, max_new_tokens, overlong_buffer, overlong_floor)
        if pen is None and s.dropped is None:
            s.dropped = "overlong"
        content = (msg or {}).get("content") or ""
        has_reasoning = bool((msg or {}).get("reasoning_content"))
        s.reflections = reflection_count(content)
        conc = concision_penalty(content, s.score > 0, thinking or has_reasoning)
        s.reward = s.score + (pen or 0.0) - conc
        g.samples.append(s)
    return groups


# ---------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    rewards: list[float]
    by_kind: dict
    lengths: list[int]
    texts: list[str]

    @property
    def mean(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        return bootstrap_ci(self.rewards, level)

    def summary(self) -> dict:
        lo, hi = self.ci()
        return {"n": len(self.rewards), "mean": self.mean, "ci95": [lo, hi],
                "pass_rate": sum(r >= 1 for r in self.rewards) / len(self.rewards),
                "mean_length": sum(self.lengths) / len(self.lengths),
                "by_kind": {k: sum(v) / len(v) for k, v in sorted(self.by_kind.items())}}


def evaluate(engine, tok, tasks: Sequence[dict], *, max_new_tokens: int, thinking: bool = False, chunk: int = 256,
             scorer: Callable = score, workers: int = 4) -> EvalResult:
    """Greedy replies to `tasks`, scored by the verifiers (no shaping). A reply whose sandbox kept
    failing raises: a held-out number must not silently leave tasks out."""
    prompts, opens = zip(*(prompt_of(tok, t, thinking) for t in tasks))
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)] * len(prompts)
    results = _generate(engine, list(prompts), params, chunk, tok.decode)
    texts = [tok.decode(res.tokens) for res in results]
    scored = score_all(list(zip(tasks, texts, opens)), scorer, workers)
    rewards, by_kind, lengths = [], {}, []
    for t, res, sc in zip(tasks, results, scored):
        if isinstance(sc, SandboxError):
            raise sc
        r = sc[0]
        rewards.append(r)
        by_kind.setdefault(t["kind"], []).append(r)
        lengths.append(len(res.tokens))
    return EvalResult(rewards, by_kind, lengths, texts)


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (seeded: the same numbers every time)."""
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap_ci: no values")
    r = random.Random(seed)
    means = sorted(sum(values[r.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    a = (1 - level) / 2
    return means[int(math.floor(a * resamples))], means[min(resamples - 1, int(math.ceil((1 - a) * resamples)) - 1)]


def paired_diff_ci(before: Sequence[float], after: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of after - before over the same tasks and its bootstrap interval."""
    if len(before) != len(after):
        raise ValueError(f"paired_diff_ci: {len(before)} vs {len(after)} values")
    d = [b - a for a, b in zip(before, after)]
    lo, hi = bootstrap_ci(d, level)
    return sum(d) / len(d), lo, hi
