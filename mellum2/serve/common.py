"""What completions and chat share: the server's state, request -> SamplingParams, the context and
limit checks, submitting a request's choices, SSE framing, and the client-disconnect watch.

Sampling defaults are OpenAI's (temperature 1, top_p 1); vLLM's extensions (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids) map to the engine's SamplingParams one to one.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass

from mellum2.infer import SamplingParams

from .backend import Backend, Handle, Overloaded
from .protocol import APIError, bad_request


@dataclass
class ServeState:
    backend: Backend
    tokenizer: object
    model_name: str
    max_model_len: int
    vocab_size: int
    eos_ids: tuple[int, ...]
    api_key: str | None = None
    retry_after_s: int = 1

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model",
                           "model_not_found")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sampling(req, max_tokens: int, stop_ids: tuple[int, ...] = (), logprobs: bool = False,
             top_logprobs: int = 0) -> SamplingParams:
    """SamplingParams of one choice (the seed is the request's; choices get seed + index later)."""
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias")
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    extra = {}
    if req.frequency_penalty:
        if "frequency_penalty" not in fields:
            raise bad_request("frequency_penalty is not supported by this engine (presence_penalty and "
                              "repetition_penalty are)", "frequency_penalty")
        extra["frequency_penalty"] = req.frequency_penalty
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise bad_request("stop: stop sequences must be non-empty strings", "stop")
    bad = [t for t in (req.stop_token_ids or []) if not 0 <= t < 2**31]
    if bad:
        raise bad_request(f"stop_token_ids: invalid token ids {bad[:5]}", "stop_token_ids")
    top_k = req.top_k if req.top_k and req.top_k > 0 else None
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else float(req.temperature),
            top_k=top_k, top_p=req.top_p, min_p=req.min_p or None, repetition_penalty=float(req.repetition_penalty),
            presence_penalty=float(req.presence_penalty), seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids or ()) + tuple(stop_ids), stop=tuple(stop),
            ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs, **extra)
    except ValueError as e:
        raise bad_request(str(e).replace("SamplingParams.", "").replace("max_new_tokens", "max_tokens")) from None


def check_prompt(state: ServeState, ids: list[int], max_tokens: int | None, where: str) -> int:
    """The token budget of a prompt (max_tokens, or all the room left); 400 when it does not fit."""
    if not ids:
        raise bad_request(f"{where}: the prompt is empty", where)
    bad = [t for t in ids if not 0 <= t < state.vocab_size]
    if bad:
        raise bad_request(f"{where}: token ids outside the vocabulary [0, {state.vocab_size}): {bad[:5]}", where)
    L, P = state.max_model_len, len(ids)
    if max_tokens is not None and max_tokens > L:
        raise bad_request(f"max_tokens: {max_tokens} is more than this model's maximum context length of {L} "
                          f"tokens", "max_tokens")
    want = P + (max_tokens if max_tokens is not None else 1)
    if want > L:
        raise bad_request(f"This model's maximum context length is {L} tokens. However, you requested {want} "
                          f"tokens ({P} in the {where}, {want - P} in the completion). Please reduce the length "
                          f"of the {where} or completion.", where, "context_length_exceeded")
    return max_tokens if max_tokens is not None else L - P


def submit_all(state: ServeState, prompts: list[tuple[list[int], SamplingParams]], n: int) -> list[Handle]:
    """Submit n choices of each prompt on one shared queue (choice index = prompt * n + j); the j-th
    choice of a seeded request samples with seed + j. All or nothing: 503 when the queue is full."""
    q: asyncio.Queue = asyncio.Queue()
    handles: list[Handle] = []
    try:
        for i, (ids, p) in enumerate(prompts):
            for j in range(n):
                pj = p.replace(seed=p.seed + j) if (p.seed is not None and j) else p
                handles.append(state.backend.submit(ids, pj, queue=q, tag=i * n + j))
    except Overloaded as e:
        for h in handles:
            state.backend.cancel(h)
        raise APIError(503, f"The server is overloaded: {e}. Retry later.", "server_overloaded", None,
                       "server_overloaded", {"Retry-After": str(state.retry_after_s)}) from None
    return handles


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_event(message: str) -> str:
    return sse({"error": {"message": message, "type": "internal_server_error", "param": None, "code": 500}})


async def collect(state: ServeState, handles: list[Handle], request, on_out) -> None:
    """Run the choices to their end for a non-streaming response, calling on_out(handle, out); stops
    them if the client disconnects (the body has been read, so the next receive() is the disconnect)."""
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        agen = state.backend.outputs(handles)
        while True:
            nxt = asyncio.ensure_future(agen.__anext__())
            done, _ = await asyncio.wait({nxt, watch}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                await agen.aclose()
                raise asyncio.CancelledError("client disconnected")
            try:
                h, out = nxt.result()
            except StopAsyncIteration:
                return
            on_out(h, out)
    finally:
        watch.cancel()


async def _disconnected(request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def token_str(tok, i: int) -> str:
    return tok.decode([i]) if 0 <= i < tok.vocab_size else ""


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
