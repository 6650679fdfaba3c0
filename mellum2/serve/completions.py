"""`POST /v1/completions`: text or token prompts (one or a list), `suffix` -> fill-in-the-middle,
n choices, echo, logprobs, stop, streaming, usage. Behaves as vLLM's OpenAI server where OpenAI's
reference is silent.

Prompt encoding: a string becomes `<|endoftext|>` (the bos) + its tokens, as `mellum2 generate` does
(not doubled when the text already starts with it); token ids are taken as they are. With `suffix`
the prompt is the PSM fill-in-the-middle arrangement the model was trained on (mellum2/infer/fim.py:
`<|endoftext|><fim_prefix>prompt<fim_suffix>suffix<fim_middle>`) and the FIM sentinels, `<filename>`
and the eos end the middle. Logprobs follow the legacy completions format (tokens, token_logprobs,
top_logprobs as {token: logprob}, text_offset); echo puts the prompt text before the completion
(prompt logprobs are not computed: echo with logprobs is refused).
"""
from __future__ import annotations

import logging

from fastapi.responses import JSONResponse, StreamingResponse

from mellum2.infer.fim import fim_prompt, fim_stop_ids

from .common import (SSE_DONE, ServeState, check_prompt, collect, error_event, new_id, now, sampling, sse,
                     submit_all, token_str, usage)
from .protocol import APIError, CompletionRequest, bad_request
from .text import TextStream

log = logging.getLogger("mellum2.serve")


def _prompts(state: ServeState, req: CompletionRequest) -> list[list[int]]:
    tok, p = state.tokenizer, req.prompt
    if isinstance(p, str):
        texts, ids = [p], None
    elif p and all(isinstance(x, str) for x in p):
        texts, ids = list(p), None
    elif p and all(isinstance(x, int) for x in p):
        texts, ids = None, [list(p)]
    elif p and all(isinstance(x, list) for x in p):
        texts, ids = None, [list(x) for x in p]
    else:
        raise bad_request("prompt: expected a string, a list of strings, a list of token ids or a list of such "
                          "lists (non-empty)", "prompt")
    if req.suffix is not None:
        if texts is None:
            raise bad_request("suffix: fill-in-the-middle needs a text prompt (got token ids)", "suffix")
        try:
            return [fim_prompt(tok, t, req.suffix) for t in texts]
        except ValueError as e:
            raise bad_request(f"suffix: {e}", "suffix") from None
    if texts is not None:
        bos = getattr(tok, "bos_id", None)
        out = []
        for t in texts:
            enc = tok.encode(t)
            out.append(enc if bos is None or enc[:1] == [bos] else [bos] + enc)
        return out
    return ids


def _logprobs(tok, ids, lps, tops, offset0: int) -> dict:
    strs = [token_str(tok, i) for i in ids]
    offs, o = [], offset0
    for s in strs:
        offs.append(o)
        o += len(s)
    return {"tokens": strs, "token_logprobs": lps,
            "top_logprobs": None if tops is None else [{token_str(tok, i): lp for i, lp in row} for row in tops],
            "text_offset": offs}


class _Choice:
    def __init__(self, state: ServeState, prompt_ids: list[int], params, echo: bool, want_lp: bool, hide):
        self.tok = state.tokenizer
        self.text = TextStream(self.tok, params.stop, hide)
        self.prompt_ids, self.want_lp, self.hide = prompt_ids, want_lp, set(hide)
        self.head = self.tok.decode(prompt_ids) if echo else ""
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.tops: list | None = [] if params.top_logprobs else None
        self.finish: str | None = None
        self.n_tokens = 0
        self.sent_chars = len(self.head)

    def push(self, out) -> tuple[str, dict | None]:
        """(new text, logprobs of the new tokens) of one output."""
        self.n_tokens += len(out.token_ids)
        keep = [k for k, t in enumerate(out.token_ids) if t not in self.hide]  # the eos is not in the text
        ids = [out.token_ids[k] for k in keep]
        self.ids += ids
        lp = None
        if self.want_lp and out.logprobs is not None:
            lps = [out.logprobs[k] for k in keep]
            tops = [out.top_logprobs[k] for k in keep] if out.top_logprobs is not None else None
            self.lps += lps
            if self.tops is not None and tops is not None:
                self.tops += tops
            lp = _logprobs(self.tok, ids, lps, tops, self.sent_chars)
        text = self.text.push(out.token_ids)
        if out.finish_reason is not None:
            text += self.text.finish()
            self.finish = out.finish_reason
        self.sent_chars += len(text)
        return text, lp


async def create(state: ServeState, req: CompletionRequest, request):
    state.check_model(req.model)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of: only best_of == n is supported", "best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs needs prompt logprobs, which this server does not compute",
                          "echo")
    if req.suffix is not None and req.echo:
        raise bad_request("suffix and echo cannot be combined", "suffix")
    prompts = _prompts(state, req)
    stop_ids = fim_stop_ids(state.tokenizer) if req.suffix is not None else ()
    hide = set(stop_ids) | set(req.stop_token_ids or ()) | (set() if req.ignore_eos else set(state.eos_ids))
    want_lp = req.logprobs is not None
    subs = []
    for k, ids in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
        budget = check_prompt(state, ids, req.max_tokens, where)
        subs.append((ids, sampling(req, budget, stop_ids, want_lp, req.logprobs or 0)))
    n = req.n
    handles = submit_all(state, subs, n)
    choices = [_Choice(state, subs[h.tag // n][0], h.params, req.echo, want_lp, hide) for h in handles]
    rid, created, name = new_id("cmpl"), now(), state.model_name
    n_prompt = sum(len(ids) for ids, _ in subs) * n

    if not req.stream:
        texts = [c.head for c in choices]
        errors = []

        def on_out(h, out):
            if out.error is not None:
                errors.append(out.error)
                return
            t, _ = choices[h.tag].push(out)
            texts[h.tag] += t

        await collect(state, handles, request, on_out)
        if errors:
            raise APIError(500, f"generation failed: {errors[0]}", "internal_server_error")
        body = {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": i, "text": texts[i], "finish_reason": c.finish,
                             "logprobs": _logprobs(c.tok, c.ids, c.lps, c.tops, len(c.head)) if want_lp else None}
                            for i, c in enumerate(choices)],
                "usage": usage(n_prompt, sum(c.n_tokens for c in choices))}
        return JSONResponse(body)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        try:
            async for e in _events():
                yield e
        except Exception as e:  # noqa: BLE001 - a bug while streaming ends this stream only, in the protocol
            log.exception("streaming %s failed", rid)
            yield error_event(f"internal error: {type(e).__name__}: {e}")
            yield SSE_DONE

    async def _events():
        def chunk(i, text, lp=None, finish=None):
            return sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                        "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})

        for i, c in enumerate(choices):
            if c.head:
                yield chunk(i, c.head)
        async for h, out in state.backend.outputs(handles):
            if out.error is not None:
                yield error_event(f"generation failed: {out.error}")
                break
            text, lp = choices[h.tag].push(out)
            if text or lp or out.finish_reason:
                yield chunk(h.tag, text, lp, out.finish_reason)
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [],
                       "usage": usage(n_prompt, sum(c.n_tokens for c in choices))})
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
