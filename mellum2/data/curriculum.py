"""Mellum 2's three-phase curriculum: domain mixtures, token budgets, FIM rates, repetition caps.

From the report (docs/mellum2.md §3):

    phase  budget  web / code / math   FIM rate
    1      58%     70 / 23 / 6         50%, all documents
    2      26%     44 / 42 / 14        10%, all documents
    3      16%     23 / 59 / 18        50%, code documents only

and no source repeated more than 4 times. Phase 1's mixture sums to 99% in the report; weights are
normalised over the domains present. The LR schedule decays over phase 3, so the trainer reads
`phase_boundaries(total_tokens)`.

How the loader draws (our design, in this file):
- `DomainStream`: each domain is read in a fresh seeded permutation per epoch; rank r of W takes
  positions r, r+W, r+2W, ... so ranks see disjoint documents within an epoch; after `max_repeats`
  epochs the domain is exhausted (the repetition cap, counted over the whole run).
- `DeficitMixer`: the next document comes from the domain furthest below its share of the tokens
  drawn so far in the phase (largest w_d * total - drawn_d). Deterministic, and the token mixture
  tracks the weights to within one document's length at every point, instead of a random draw's
  sqrt(n) drift.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .document import DOMAINS
MAX_REPEATS = 4


@dataclass(frozen=True)
class Phase:
    name: str
    budget: float  # fraction of the run's tokens
    mixture: dict[str, float] = field(default_factory=dict)  # domain -> weight (normalised on use)
    fim_rate: float = 0.0
    fim_code_only: bool = False
    spm_rate: float = 0.5  # share of the FIM pieces in SPM order (the rest PSM); the report's 50/50

    def weights(self, present: list[str] | tuple[str, ...]) -> dict[str, float]:
        """Mixture normalised over the `present` domains with a positive weight."""
        w = {d: float(self.mixture.get(d, 0.0)) for d in present if self.mixture.get(d, 0.0) > 0}
        total = sum(w.values())
        return {d: v / total for d, v in w.items()} if total > 0 else {}


DEFAULT_PHASES: tuple[Phase, ...] = (
    Phase("phase1", 0.58, {"web": 70, "code": 23, "math": 6}, fim_rate=0.5),
    Phase("phase2", 0.26, {"web": 44, "code": 42, "math": 14}, fim_rate=0.1),
    Phase("phase3", 0.16, {"web": 23, "code": 59, "math": 18}, fim_rate=0.5, fim_code_only=True),
)


# named curricula for `mellum2 train --phases NAME`: the report's, and the demo's (what wins on held-out
# Python for `tiny` on the embedded corpus at a few million tokens; docs/train.md "The demo's recipe").
# The demo's: web/code/math 5/90/5 in every phase (the held-out text is code) and a longer last phase
# (budgets 45/20/35 instead of 58/26/16: the learning rate decays over it); the report's FIM rates, all
# PSM (the order inference prompts use: a model this small does not learn both orders apart, and after
# `<fim_middle>` wrote the SPM stream's document start, a docstring, into PSM middles).
DEMO_PHASES: tuple[Phase, ...] = (
    Phase("phase1", 0.45, {"web": 5, "code": 90, "math": 5}, fim_rate=0.5, spm_rate=0.0),
    Phase("phase2", 0.20, {"web": 5, "code": 90, "math": 5}, fim_rate=0.1, spm_rate=0.0),
    Phase("phase3", 0.35, {"web": 5, "code": 90, "math": 5}, fim_rate=0.5, fim_code_only=True, spm_rate=0.0),
)
PHASE_PRESETS: dict[str, tuple[Phase, ...]] = {"report": DEFAULT_PHASES, "demo": DEMO_PHASES}


def named_phases(spec: str | None):
    """`--phases`: None or a preset name (PHASE_PRESETS) or a JSON list of Phase fields -> phases for
    resolve_phases (None: the report's). Errors name what is wrong."""
    if spec is None or spec == "report":
        return None
    if spec in PHASE_PRESETS:
        return PHASE_PRESETS[spec]
    try:
        v = json.loads(spec)
    except json.JSONDecodeError:
        raise ValueError(f"--phases {spec!r}: neither a preset ({', '.join(PHASE_PRESETS)}) nor a JSON list") from None
    if not isinstance(v, list):
        raise ValueError(f"--phases: expected a JSON list of phases, got {type(v).__name__}")
    return resolve_phases(v)


def resolve_phases(phases=None, fim_rates=None) -> tuple[Phase, ...]:
    """Phases from None (defaults), Phase objects or dicts with Phase's fields; `fim_rates` (one per
    phase) overrides their FIM rates. Errors name the phase and field."""
    out = []
    for k, p in enumerate(DEFAULT_PHASES if phases is None else phases):
        if isinstance(p, dict):
            unknown = set(p) - {"name", "budget", "mixture", "fim_rate", "fim_code_only", "spm_rate"}
            if unknown:
                raise ValueError(f"phases[{k}]: unknown field(s) {sorted(unknown)}")
            p = Phase(**{"name": f"phase{k + 1}", **p})
        if not isinstance(p, Phase):
            raise TypeError(f"phases[{k}]: expected a Phase or dict, got {type(p).__name__}")
        bad = set(p.mixture) - set(DOMAINS)
        if bad:
            raise ValueError(f"phases[{k}].mixture: unknown domain(s) {sorted(bad)}, expected {DOMAINS}")
        if any(v < 0 for v in p.mixture.values()) or sum(p.mixture.values()) <= 0:
            raise ValueError(f"phases[{k}].mixture: weights must be >= 0 with a positive sum, got {p.mixture}")
        if not p.budget > 0:
            raise ValueError(f"phases[{k}].budget: must be > 0, got {p.budget}")
        out.append(p)
    if not out:
        raise ValueError("phases: need at least one phase")
    if fim_rates is not None:
        if len(fim_rates) != len(out):
            raise ValueError(f"fim_rates: need one rate per phase ({len(out)}), got {len(fim_rates)}")
        out = [Phase(p.name, p.budget, p.mixture, float(r), p.fim_code_only, p.spm_rate) for p, r in zip(out, fim_rates)]
    for k, p in enumerate(out):
        for name in ("fim_rate", "spm_rate"):
            v = getattr(p, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"phases[{k}].{name}: must be in [0, 1], got {v!r}")
    total = sum(p.budget for p in out)
    return tuple(Phase(p.name, p.budget / total, dict(p.mixture), p.fim_rate, p.fim_code_only, float(p.spm_rate))
                 for p in out)


def phase_boundaries(total_tokens: int, phases=DEFAULT_PHASES) -> list[int]:
    """Cumulative token counts where each phase ends: [start of phase 2, start of phase 3, end]."""
    if total_tokens < 1:
        raise ValueError(f"phase_boundaries: total_tokens must be >= 1, got {total_tokens}")
    cum = np.cumsum([p.budget for p in phases])
    bounds = [int(round(total_tokens * c / cum[-1])) for c in cum]
    bounds[-1] = int(total_tokens)
    return bounds


def phase_at(tokens_seen: int, boundaries: list[int]) -> int:
    """Index of the phase that `tokens_seen` falls in (the last phase past the end)."""
    for k, b in enumerate(boundaries):
        if tokens_seen < b:
            return k
    return len(boundaries) - 1


def plan(total_tokens: int, domain_tokens: dict[str, int], phases=DEFAULT_PHASES,
         max_repeats: int = MAX_REPEATS) -> list[dict]:
    """Tokens each phase asks of each domain and the epochs that implies (cumulative), for a budget.
    A domain whose cumulative epochs exceed `max_repeats` will run out and be renormalised away."""
    present = [d for d in DOMAINS if domain_tokens.get(d, 0) > 0]
    bounds, prev, used = phase_boundaries(total_tokens, phases), 0, {d: 0.0 for d in present}
    rows = []
    for p, end in zip(phases, bounds):
        w = p.weights(present)
        demand = {d: (end - prev) * w.get(d, 0.0) for d in present}
        for d in present:
            used[d] += demand[d]
        rows.append({"phase": p.name, "tokens": end - prev, "demand": demand,
                     "epochs": {d: used[d] / domain_tokens[d] for d in present},
                     "capped": [d for d in present if used[d] / domain_tokens[d] > max_repeats]})
        prev = end
    return rows


class DomainStream:
    """Document indices of one domain for one rank: a seeded permutation per epoch, strided by rank."""

    def __init__(self, n_docs: int, seed: int, key: int, rank: int = 0, world_size: int = 1,
                 max_repeats: int = MAX_REPEATS):
        self.n, self.seed, self.key = n_docs, seed, key
        self.rank, self.world_size, self.max_repeats = rank, world_size, max_repeats
        self.epoch, self.pos = 0, rank
        self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)

    @property
    def exhausted(self) -> bool:
        return self.epoch >= self.max_repeats or self.n == 0

    def next(self) -> int | None:
        """The next document index, or None once the repetition cap is reached."""
        while not self.exhausted:
            if self.pos < self.n:
                if self._perm_epoch != self.epoch:
                    self._perm = np.random.default_rng([self.seed, self.key, self.epoch]).permutation(self.n)
                    self._perm_epoch = self.epoch
                i = int(self._perm[self.pos])
                self.pos += self.world_size
                return i
            self.epoch, self.pos = self.epoch + 1, self.rank
        return None

    def state(self) -> list[int]:
        return [self.epoch, self.pos]

    def load_state(self, state: list[int]) -> None:
        self.epoch, self.pos = int(state[0]), int(state[1])


class DeficitMixer:
    """Chooses the domain of the next document so drawn tokens track the phase's weights."""

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)
        self.drawn = {d: 0 for d in weights}

    def choose(self, available: set[str]) -> str | None:
        live = [d for d in self.weights if d in available]
        if not live:
            return None
        total = sum(self.drawn.values()) + 1
        wsum = sum(self.weights[d] for d in live)
        return max(live, key=lambda d: self.weights[d] / wsum * total - self.drawn[d])

    def add(self, domain: str, n_tokens: int) -> None:
        self.drawn[domain] += n_tokens
