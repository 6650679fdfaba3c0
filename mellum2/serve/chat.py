"""`POST /v1/chat/completions`: messages rendered with the chat template (mellum2.chat), output read
back by the incremental parser into `content`, `reasoning_content` (as vLLM's Qwen3 reasoning
parser) and `tool_calls` (as vLLM's Hermes tool parser), in the message and as stream deltas.

- `chat_template_kwargs.enable_thinking` (default true) switches reasoning; other keys reach the
  template as variables, as in vLLM.
- tool_choice: "auto" (the default with tools) renders the tools and parses calls; "none" leaves
  the tools out of the prompt; "required" and a named function turn thinking off and start the
  assistant turn with the opening of a call (`<tool_call>\n{"name": "` or, named, the name and
  `"arguments": `), so the model must write one call, which `</tool_call>` ends. (vLLM forces these
  with guided decoding; this prefix forcing needs no grammar, and a call the model writes badly
  still comes back as content with the parser's error, never as a made-up call.)
- finish_reason is "tool_calls" when the reply holds a call and ended by itself.
- A turn ends at `<|im_end|>`, `<|endoftext|>` or a new `<|im_start|>` (none of them in the text).
"""
from __future__ import annotations

import json
import uuid

import logging

from fastapi.responses import JSONResponse, StreamingResponse

from mellum2.chat import ChatFormatError, StreamParser, opens_think, render

from .common import (SSE_DONE, ServeState, check_prompt, collect, error_event, new_id, now, sampling, sse,
                     submit_all, token_str, usage)
from .protocol import APIError, ChatRequest, bad_request
from .text import TextStream

log = logging.getLogger("mellum2.serve")


def _prompt(state: ServeState, req: ChatRequest) -> tuple[str, str, list[int], tuple[int, ...]]:
    """(rendered prompt, forced start of the reply, prompt ids, extra stop ids)."""
    kw = dict(req.chat_template_kwargs or {})
    think = kw.pop("enable_thinking", True)
    if not isinstance(think, bool):
        raise bad_request("chat_template_kwargs.enable_thinking: expected a boolean", "chat_template_kwargs")
    for k in ("messages", "tools", "add_generation_prompt"):
        if k in kw:
            raise bad_request(f"chat_template_kwargs.{k}: set by the request itself", "chat_template_kwargs")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and choice != "auto" and not tools:
        raise bad_request("tool_choice: needs tools (none were given)", "tool_choice")
    forced, stop_ids = "", ()
    if not isinstance(choice, str):
        names = [t["function"]["name"] for t in tools]
        if choice.function.name not in names:
            raise bad_request(f"tool_choice: no tool named {choice.function.name!r} (tools: {', '.join(names)})",
                              "tool_choice")
        forced = '<tool_call>\n{"name": ' + json.dumps(choice.function.name, ensure_ascii=False) + ', "arguments": '
    elif choice == "required":
        forced = '<tool_call>\n{"name": "'
    if forced:
        think, stop_ids = False, (state.tokenizer.tool_call_end_id,)
    try:
        text = render(req.messages, tools if choice != "none" else None, add_generation_prompt=True,
                      enable_thinking=think, **kw)
    except ChatFormatError as e:
        raise bad_request(str(e), "messages") from None
    except Exception as e:  # the template raised on something validate() let through
        raise bad_request(f"messages: the chat template cannot render them ({e})", "messages") from None
    return text, forced, state.tokenizer.encode(text + forced), stop_ids


class _Choice:
    def __init__(self, state: ServeState, prompt: str, forced: str, hide, want_lp: bool):
        self.tok = state.tokenizer
        self.parser = StreamParser(think_open=opens_think(prompt), id_prefix=f"call_{uuid.uuid4().hex[:12]}_")
        self.text = TextStream(self.tok, (), hide)
        self.forced, self.want_lp, self.hide = forced, want_lp, set(hide)
        self.lps: list[dict] = []
        self.finish: str | None = None
        self.n_tokens = 0
        self.params = None

    def start(self) -> list[dict]:
        return self.parser.feed(self.forced) if self.forced else []

    def push(self, out) -> tuple[list[dict], list[dict] | None]:
        """(parser deltas, logprob entries) of one output."""
        self.n_tokens += len(out.token_ids)
        lp = None
        if self.want_lp and out.logprobs is not None:
            lp = []
            for k, t in enumerate(out.token_ids):
                if t in self.hide:
                    continue
                tops = out.top_logprobs[k] if out.top_logprobs is not None else []
                lp.append(_lp_entry(self.tok, t, out.logprobs[k], tops))
            self.lps += lp
        piece = self.text.push(out.token_ids)
        if out.finish_reason is not None:
            piece += self.text.finish()
        deltas = self.parser.feed(piece) if piece else []
        if out.finish_reason is not None:
            deltas += self.parser.close()
            calls = self.parser.message["tool_calls"]
            self.finish = "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
        return [d for d in deltas if "error" not in d], lp

    def message(self) -> dict:
        m = self.parser.message
        msg = {"role": "assistant", "content": m["content"] if (m["content"] or not m["tool_calls"]) else None,
               "reasoning_content": m["reasoning_content"], "tool_calls": m["tool_calls"]}
        return msg


def _lp_entry(tok, t, lp, tops) -> dict:
    s = token_str(tok, t)
    return {"token": s, "logprob": lp, "bytes": list(s.encode()),
            "top_logprobs": [{"token": token_str(tok, i), "logprob": v, "bytes": list(token_str(tok, i).encode())}
                             for i, v in tops]}


async def create(state: ServeState, req: ChatRequest, request):
    state.check_model(req.model)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs: needs logprobs=true", "top_logprobs")
    prompt, forced, ids, forced_stop = _prompt(state, req)
    tok = state.tokenizer
    chat_stops = tuple(sorted({i for i in (tok.eos_id, tok.eot_id, tok.im_start_id) if i is not None}))
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    budget = check_prompt(state, ids, max_tokens, "messages")
    params = sampling(req, budget, chat_stops + forced_stop, req.logprobs, req.top_logprobs or 0)
    hide = set(chat_stops) | set(req.stop_token_ids or ()) | (set() if req.ignore_eos else set(state.eos_ids))
    handles = submit_all(state, [(ids, params)], req.n)
    choices = [_Choice(state, prompt, forced, hide, req.logprobs) for _ in handles]
    rid, created, name = new_id("chatcmpl"), now(), state.model_name
    n_prompt = len(ids) * req.n

    if not req.stream:
        errors = []
        for c in choices:
            c.start()

        def on_out(h, out):
            if out.error is not None:
                errors.append(out.error)
            else:
                choices[h.tag].push(out)

        await collect(state, handles, request, on_out)
        if errors:
            raise APIError(500, f"generation failed: {errors[0]}", "internal_server_error")
        body = {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": i, "message": c.message(), "finish_reason": c.finish,
                             "logprobs": {"content": c.lps} if req.logprobs else None}
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
        def chunk(i, delta, lp=None, finish=None):
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": i, "delta": delta, "logprobs": None if lp is None else {"content": lp},
                                     "finish_reason": finish}]})

        for i, c in enumerate(choices):
            yield chunk(i, {"role": "assistant", "content": ""})
            for d in c.start():
                yield chunk(i, d)
        async for h, out in state.backend.outputs(handles):
            if out.error is not None:
                yield error_event(f"generation failed: {out.error}")
                break
            c = choices[h.tag]
            deltas, lp = c.push(out)
            for k, d in enumerate(deltas):
                yield chunk(h.tag, d, lp if k == 0 else None)
            if lp and not deltas:
                yield chunk(h.tag, {}, lp)
            if out.finish_reason is not None:
                yield chunk(h.tag, {}, None, c.finish)
        if include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [], "usage": usage(n_prompt, sum(c.n_tokens for c in choices))})
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
