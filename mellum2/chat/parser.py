"""The output parser: generated text -> an OpenAI-shaped assistant message (the reference).

    parse(text, think_open=False, id_prefix="call_") -> {"role": "assistant", "content": str,
        "reasoning_content": str | None, "tool_calls": [{"id", "type": "function",
        "function": {"name", "arguments": <JSON string>}}], "errors": [str]}

It inverts the template (template.jinja) for one assistant turn, the way vLLM's Qwen3 reasoning parser
and Hermes tool parser read such output:

1. The text ends at the first `<|im_end|>` or `<|endoftext|>` (the stop tokens); the rest is ignored.
2. Reasoning: if the text starts (after whitespace) with `<think>`, or `think_open` says the prompt
   already opened the span, everything up to the first `</think>` is reasoning, less the one newline
   the template puts on each side. An unclosed span (output cut by the token budget) is all reasoning.
   After `</think>` up to two newlines (the template's separator) are dropped. `reasoning_content` is
   None when there was no think span.
3. Tool calls: each `<tool_call> ... </tool_call>` holds `{"name": str, "arguments": object}`
   (arguments may be left out: `{}`). A valid call becomes an entry of `tool_calls` with `arguments`
   re-serialised as `json.dumps(args, ensure_ascii=False)`, which is what the template's `tojson`
   writes, so render -> parse -> render is the identity. Ids are `id_prefix + k`, k counting every
   `<tool_call>` of the text (pass a unique prefix per response where ids must be unique).
   A malformed call (invalid JSON, duplicate keys, not an object, no name, arguments not an object,
   no `</tool_call>` before the end) is never dropped: its raw text, tags included, stays in
   `content` and `errors` says what is wrong ("tool call 1: ...").
4. Content is the text outside the think span and the calls. The newline the template writes before
   each call is removed, and so is whitespace-only text after a call.

stream.py implements the same rules incrementally (feed pieces, get deltas); a property test checks
that both agree for every way of cutting a text into pieces.
"""
from __future__ import annotations

import json

THINK, THINK_END = "<think>", "</think>"
CALL, CALL_END = "<tool_call>", "</tool_call>"
STOPS = ("<|im_end|>", "<|endoftext|>")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _kind(x) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(x), type(x).__name__)


def tool_call(body: str | None, k: int, id_prefix: str = "call_") -> tuple[dict | None, str | None]:
    """One `<tool_call>` body -> (OpenAI tool call, None) or (None, what is wrong). body None: unclosed."""
    if body is None:
        return None, f"tool call {k}: unclosed <tool_call> (no </tool_call> before the end of the output)"
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        return None, f"tool call {k}: duplicate key {str(e)!r}"
    except json.JSONDecodeError as e:
        return None, f"tool call {k}: invalid JSON ({e.msg} at character {e.pos})"
    if not isinstance(obj, dict):
        return None, f"tool call {k}: expected a JSON object with name and arguments, got {_kind(obj)}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None, f"tool call {k}: no function name (\"name\" must be a non-empty string, got {_kind(name)})"
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        return None, f"tool call {k}: \"arguments\" must be a JSON object, got {_kind(args)}"
    return {"id": f"{id_prefix}{k}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}, None


def _drop_newline(s: str, at_end: bool = False) -> str:
    if at_end:
        return s[:-1] if s.endswith("\n") else s
    return s[1:] if s.startswith("\n") else s


def parse(text: str, think_open: bool = False, id_prefix: str = "call_") -> dict:
    """The assistant message in `text` (generated output, optionally ending with <|im_end|>).

    think_open: the prompt ended inside an open `<think>` span (`opens_think(prompt)`), so the text
    starts as reasoning."""
    if not isinstance(text, str):
        raise TypeError(f"parse: expected str, got {type(text).__name__}")
    cut = min((i for i in (text.find(s) for s in STOPS) if i >= 0), default=len(text))
    text = text[:cut]

    reasoning, rest = None, text
    lead = text.lstrip()
    if lead.startswith(THINK) or think_open:
        body = lead[len(THINK):] if lead.startswith(THINK) else text
        end = body.find(THINK_END)
        if end < 0:
            reasoning, rest = _drop_newline(body), ""
        else:
            reasoning = _drop_newline(_drop_newline(body[:end]), at_end=True)
            rest = body[end + len(THINK_END):]
            for _ in range(2):
                rest = _drop_newline(rest)

    content, calls, errors = [], [], []
    pos, k, after_call = 0, 0, False
    while True:
        start = rest.find(CALL, pos)
        seg = rest[pos:] if start < 0 else rest[pos:start]
        blank_after_call = after_call and not seg.strip()
        if start < 0:
            if not blank_after_call:
                content.append(seg)
            break
        if blank_after_call:
            seg, sep = "", seg
        elif seg.endswith("\n"):
            seg, sep = seg[:-1], "\n"
        else:
            sep = ""
        content.append(seg)
        end = rest.find(CALL_END, start + len(CALL))
        if end < 0:
            raw, body, pos = rest[start:], None, len(rest)
        else:
            raw, body, pos = rest[start:end + len(CALL_END)], rest[start + len(CALL):end], end + len(CALL_END)
        call, err = tool_call(body, k, id_prefix)
        if err:
            content.append(sep + raw)
            errors.append(err)
        else:
            calls.append(call)
        k += 1
        after_call = True
        if end < 0:
            break
    return {"role": "assistant", "content": "".join(content), "reasoning_content": reasoning,
            "tool_calls": calls, "errors": errors}
