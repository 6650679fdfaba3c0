"""Per-request sampling parameters and the batched logits -> token step.

Order of the transforms (as in transformers' generate and vLLM): repetition penalty (CTRL, Keskar et
al. 2019: divide positive logits of every token seen in prompt or output by the penalty, multiply
negative ones), presence penalty (OpenAI: subtract it from every token already in the output),
temperature, top-k, top-p (nucleus, Holtzman et al. 2019), min-p (Nguyen et al. 2024). Temperature
0 is greedy: the argmax of the penalised logits. Every row of a batch has its own parameters.

`probs()` returns the distribution a token is actually drawn from (one-hot for greedy rows), which
is what lossless speculative verification needs for both the target and the draft; `sample()` draws
from it with the exponential race (argmax p / E, E ~ Exp(1): an exact draw from p) using one
torch.Generator per row, so a request's seed gives the same tokens whatever batch it runs in.
Logprobs (`logprobs_mode`, per request) of each emitted token:
- "raw" (default): log_softmax of the model's logits, nothing applied (vLLM's raw_logprobs);
- "scaled": log_softmax(logits / temperature) (raw for greedy rows): the policy's own distribution
  at that temperature, which RL's importance ratios need (the "inference" logprobs);
- "processed": log of the distribution the token was actually drawn from, after penalties,
  temperature, top-k, top-p and min-p (0 for a greedy row's argmax; -inf outside the kept set).

Shapes: B rows, N positions per row (1 when decoding plainly, k+1 when verifying k drafts), V vocab.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


LOGPROBS_MODES = ("raw", "scaled", "processed")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's eos ids (unless ignore_eos)
    stop: tuple[str, ...] = ()  # stop strings; need a detokenizer
    ignore_eos: bool = False
    logprobs: bool = False  # per-token logprob of each new token
    top_logprobs: int = 0  # and the n most likely alternatives at each step
    logprobs_mode: str = "raw"  # "raw", "scaled" or "processed" (module docstring)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        self.validate()

    def validate(self) -> None:
        def bad(name, want):
            raise ValueError(f"SamplingParams.{name}: expected {want}, got {getattr(self, name)!r}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad("max_new_tokens", "an int >= 0")
        if not self.temperature >= 0:
            bad("temperature", "a number >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            bad("top_k", "None or an int >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", "None or a number in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad("min_p", "None or a number in [0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "a number > 0 (1 = off)")
        if self.top_logprobs < 0:
            bad("top_logprobs", "an int >= 0")
        if self.logprobs_mode not in LOGPROBS_MODES:
            bad("logprobs_mode", f"one of {LOGPROBS_MODES}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "non-empty strings")

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """The sampling state of one batch: per-row parameters as tensors, generators, penalty memory."""

    def __init__(self, params: list[SamplingParams], vocab: int, device, prompts: list[list[int]] | None = None,
                 gens: list[torch.Generator] | None = None):
        self.params, self.V, self.device = params, vocab, device
        B = len(params)
        f = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)  # noqa: E731
        self.all_greedy = all(p.greedy for p in params)
        self.greedy_B = torch.tensor([p.greedy for p in params], device=device)
        self.temp_B11 = f([p.temperature if p.temperature > 0 else 1.0 for p in params])[:, None, None]
        self.any_temp = any(p.temperature not in (0, 1) for p in params)
        self.kmax = max((p.top_k for p in params if p.top_k and not p.greedy), default=0)
        self.all_topk = self.kmax > 0 and all(p.top_k for p in params if not p.greedy)
        self.topk_B11 = torch.tensor([p.top_k or vocab for p in params], device=device)[:, None, None]
        self.any_topp = any(p.top_p is not None and p.top_p < 1 for p in params if not p.greedy)
        self.topp_B11 = f([p.top_p if p.top_p is not None else 1.0 for p in params])[:, None, None]
        self.any_minp = any(p.min_p for p in params if not p.greedy)
        self.minp_B11 = f([p.min_p or 0.0 for p in params])[:, None, None]
        self.any_rep = any(p.repetition_penalty != 1 for p in params)
        self.rep_B11 = f([p.repetition_penalty for p in params])[:, None, None]
        self.any_pres = any(p.presence_penalty != 0 for p in params)
        self.pres_B11 = f([p.presence_penalty for p in params])[:, None, None]
        self.want_logprobs = any(p.logprobs or p.top_logprobs for p in params)
        self.n_top = max((p.top_logprobs for p in params), default=0)
        self.modes = {p.logprobs_mode for p in params if p.logprobs or p.top_logprobs}
        self.mode_B = [p.logprobs_mode for p in params]
        if gens is None:  # a request's generator lives with the request (engine); standalone: one per row
            gens = [torch.Generator(device=device) for _ in params]
            for g, p in zip(gens, params):
                g.manual_seed(p.seed if p.seed is not None else int(torch.randint(2**62, ()).item()))
        self.gens = gens
        # penalty memory: tokens seen in prompt or output (repetition), in output only (presence)
        self.seen_BV = self.out_BV = None
        if self.any_rep:
            self.seen_BV = torch.zeros(B, vocab, dtype=torch.bool, device=device)
            for b, ids in enumerate(prompts or []):
                if ids:
                    self.seen_BV[b, torch.tensor(ids, device=device)] = True
        if self.any_pres:
            self.out_BV = torch.zeros(B, vocab, dtype=torch.bool, device=device)

    @property
    def penalties(self) -> bool:
        return self.any_rep or self.any_pres

    @property
    def plain_greedy(self) -> bool:
        """Every row greedy with no penalties: a token is an argmax of the raw logits."""
        return self.all_greedy and not (self.any_rep or self.any_pres)

    # ------------------------------------------------------------------ penalty memory
    def observe(self, tok_BN: torch.Tensor, valid_BN: torch.Tensor | None = None) -> None:
        """Remember emitted tokens (valid_BN False: not emitted, e.g. rejected drafts)."""
        for mem in (self.seen_BV, self.out_BV):
            if mem is not None:
                src = torch.ones_like(tok_BN, dtype=torch.bool) if valid_BN is None else valid_BN
                mem.scatter_reduce_(1, tok_BN, src, reduce="amax")

    def _seen(self, mem_BV, extra_BE, N):
        """mem per position [B, N, V]: position j also sees extra tokens 0 .. j + E - N (the tokens
        of the block before it: drafts being verified, or earlier drafts of a recurrent draft)."""
        m_BNV = mem_BV[:, None, :].expand(-1, N, -1)
        if extra_BE is None or extra_BE.shape[1] == 0:
            return m_BNV
        B, E = extra_BE.shape
        oh_BEV = torch.zeros(B, E, self.V, dtype=torch.bool, device=mem_BV.device)
        oh_BEV.scatter_(2, extra_BE[:, :, None], True)
        if E > 1:
            oh_BEV = oh_BEV.cummax(1).values  # [:, e]: seen among extra[:e+1]
        none_BV = torch.zeros(B, 1, self.V, dtype=torch.bool, device=mem_BV.device)
        idx = [j + E - N for j in range(N)]
        rows = [oh_BEV[:, i:i + 1] if i >= 0 else none_BV for i in idx]
        return m_BNV | torch.cat(rows, 1)

    # ------------------------------------------------------------------ transforms
    def penalised(self, logits_BNV: torch.Tensor, extra_BE: torch.Tensor | None = None) -> torch.Tensor:
        x = logits_BNV.float()
        N = x.shape[1]
        if self.any_rep:
            seen = self._seen(self.seen_BV, extra_BE, N)
            x = torch.where(seen, torch.where(x > 0, x / self.rep_B11, x * self.rep_B11), x)
        if self.any_pres:
            x = x - self.pres_B11 * self._seen(self.out_BV, extra_BE, N)
        return x

    def probs(self, logits_BNV: torch.Tensor, extra_BE: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution each token is drawn from [B, N, V] (fp32); one-hot for greedy rows.
        extra_BE: tokens not yet observed that precede the block (see `_seen`), for the penalties."""
        x = self.penalised(logits_BNV, extra_BE)
        if self.all_greedy:
            return _onehot(x.argmax(-1), self.V)
        if self.any_temp:
            x = x / self.temp_B11
        if self.all_topk:  # work among the top-kmax candidates only (already sorted)
            vals_BNk, idx_BNk = x.topk(self.kmax, dim=-1)
            p_BNk = self._warp_sorted(vals_BNk)
            p = torch.zeros_like(x).scatter_(-1, idx_BNk, p_BNk)
        else:
            if self.kmax:
                kth = x.topk(self.kmax, dim=-1).values.gather(-1, (self.topk_B11.clamp(max=self.kmax) - 1).expand(
                    x.shape[0], x.shape[1], 1))
                x = torch.where((self.topk_B11 < self.V) & (x < kth), float("-inf"), x)
            if self.any_topp:
                vals, idx = x.sort(-1, descending=True)
                x = torch.full_like(x, float("-inf")).scatter_(-1, idx, self._warp_sorted(vals, topk=False).log())
            p = self._minp(x.softmax(-1))
        greedy = _onehot(self.penalised(logits_BNV, extra_BE).argmax(-1), self.V)
        return torch.where(self.greedy_B[:, None, None], greedy, p)

    def _warp_sorted(self, vals_BNk, topk=True):
        """top-k (per row), top-p on logits sorted descending -> probabilities over those candidates."""
        k = vals_BNk.shape[-1]
        if topk:
            rank = torch.arange(k, device=vals_BNk.device)
            vals_BNk = torch.where(rank < self.topk_B11, vals_BNk, float("-inf"))
        p = vals_BNk.softmax(-1)
        if self.any_topp:
            # drop a candidate when the mass before it already reaches top_p (the first always stays)
            before = p.cumsum(-1) - p
            p = torch.where(before < self.topp_B11, p, 0.0)
            p = p / p.sum(-1, keepdim=True)
        return self._minp(p) if topk else p

    def _minp(self, p_BNV):
        if not self.any_minp:
            return p_BNV
        p = torch.where(p_BNV >= self.minp_B11 * p_BNV.amax(-1, keepdim=True), p_BNV, 0.0)
        return p / p.sum(-1, keepdim=True)

    # ------------------------------------------------------------------ drawing
    def draw(self, p_BNV: torch.Tensor) -> torch.Tensor:
        """One token per row and position from p (exponential race; per-row generators)."""
        if self.all_greedy:
            return p_BNV.argmax(-1)
        B, N, V = p_BNV.shape
        e = torch.empty_like(p_BNV)
        for b, g in enumerate(self.gens):
            e[b].exponential_(generator=g)
        return (p_BNV / e.clamp_(min=1e-30)).argmax(-1)  # exponential_ can return exactly 0

    def uniform(self, shape_BN) -> torch.Tensor:
        u = torch.empty(shape_BN, device=self.device)
        for b, g in enumerate(self.gens):
            u[b].uniform_(generator=g)
        return u

    def sample(self, logits_BNV: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N] for plain decoding (greedy fast path: one argmax)."""
        if self.plain_greedy:
            return logits_BNV.argmax(-1)
        return self.draw(self.probs(logits_BNV))

    def sample_with_probs(self, logits_BNV: torch.Tensor):
        """`sample`, and the distributions drawn from (None on the plain greedy path)."""
        if self.plain_greedy:
            return logits_BNV.argmax(-1), None
        p = self.probs(logits_BNV)
        return self.draw(p), p

    def logprobs(self, logits_BNV: torch.Tensor, tok_BN: torch.Tensor, extra_BE: torch.Tensor | None = None,
                 p_BNV: torch.Tensor | None = None):
        """(logprob of each chosen token [B, N], (top logprobs [B, N, n], their ids)), each row under its
        logprobs_mode (module docstring). extra_BE: as in `probs` (drafts before the block); p_BNV: the
        distributions the tokens were drawn from, when at hand (else recomputed for "processed")."""
        x = logits_BNV.float()
        lp = None
        for mode in sorted(self.modes) or ["raw"]:
            if mode == "raw":
                m = x.log_softmax(-1)
            elif mode == "scaled":
                m = (x / self.temp_B11).log_softmax(-1)
            else:
                m = (p_BNV if p_BNV is not None else self.probs(logits_BNV, extra_BE)).log()
            rows = torch.tensor([mb == mode for mb in self.mode_B], device=x.device)[:, None, None]
            lp = m if lp is None else torch.where(rows, m, lp)
        chosen = lp.gather(-1, tok_BN[..., None])[..., 0]
        top = lp.topk(self.n_top, dim=-1) if self.n_top else None
        return chosen, top


def _onehot(idx_BN: torch.Tensor, V: int) -> torch.Tensor:
    return torch.zeros(*idx_BN.shape, V, device=idx_BN.device).scatter_(-1, idx_BN[..., None], 1.0)
