"""The incremental output parser: feed generated text piece by piece, get OpenAI-style deltas.

    p = StreamParser(think_open=False, id_prefix="call_")
    for piece in pieces:
        for delta in p.feed(piece): ...     # {"content": s} | {"reasoning_content": s} | {"tool_calls": [...]}
                                            # | {"error": s, "index": k} (a malformed call; its text comes as content)
    for delta in p.close(): ...
    p.message                               # == parse(text, think_open, id_prefix), however the text was cut

It applies parser.py's rules as the text arrives, holding back only what the next piece could still
change: a possible prefix of a tag (`</think>`, `<tool_call>`, `<|im_end|>`, ...), the newline before
a tool call, whitespace after one. Tool calls stream as vLLM's Hermes parser streams them, the way
OpenAI's API does: first `{"tool_calls": [{"index": k, "id", "type": "function", "function": {"name",
"arguments": ""}}]}` as soon as the name and the opening `{` of the arguments have arrived, then
`{"tool_calls": [{"index": k, "function": {"arguments": piece}}]}` pieces whose concatenation is the
final `arguments` string. To make that hold for any spacing the model writes, the argument pieces are
the canonical form (`json.dumps(..., ensure_ascii=False)`) of each complete JSON token (strings,
numbers, literals, punctuation), which concatenates to exactly `json.dumps(json.loads(arguments))`.
A call in another shape (arguments before the name, missing arguments) is sent whole once closed.

`index` is the call's position among the `<tool_call>` tags of the output, as in `parse`'s ids and
errors. When the output is well formed, applying the deltas in order (`apply_delta`) gives exactly
`p.message`. A malformed call yields `{"error": ..., "index": k}` and its raw text as content; if its
name and some arguments had already been streamed they cannot be taken back, and the final message
(the authority) does not list it among the calls. `StreamParser(stream_arguments=False)` sends every call whole
after checking it, so the deltas always add up to the message, at the price of no partial arguments.
"""
from __future__ import annotations

import json

from .parser import CALL, CALL_END, STOPS, THINK, THINK_END, tool_call

_JSON_WS = " \t\n\r"
_PUNCT = "{}[],:"
# expected tokens before the arguments stream: { "name" : <str> , "arguments" : {
_PREFIX = (("{", None), ("str", "name"), (":", None), ("str", ...), (",", None), ("str", "arguments"),
           (":", None), ("{", None))


def _held(buf: str, tags) -> int:
    """Length of the longest end of `buf` that is a proper prefix of one of `tags`."""
    best = 0
    for t in tags:
        for n in range(min(len(t) - 1, len(buf)), best, -1):
            if buf.endswith(t[:n]):
                best = n
                break
    return best


class _Lexer:
    """JSON tokens from pieces of text: (kind, raw) with kind one of {}[],: "str" "bare"; whitespace
    skipped. A string is complete at its closing quote, a bare token (number, literal) at the next
    delimiter."""

    def __init__(self):
        self.kind, self.tok, self.esc = None, "", False

    def feed(self, s: str) -> list[tuple[str, str]]:
        out = []
        for ch in s:
            if self.kind == "str":
                self.tok += ch
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    out.append(("str", self.tok))
                    self.kind, self.tok = None, ""
                continue
            if self.kind == "bare":
                if ch not in _JSON_WS and ch not in _PUNCT and ch != '"':
                    self.tok += ch
                    continue
                out.append(("bare", self.tok))
                self.kind, self.tok = None, ""
            if ch in _JSON_WS:
                continue
            if ch in _PUNCT:
                out.append((ch, ch))
            else:
                self.kind, self.tok = ("str" if ch == '"' else "bare"), ch
        return out


def _canonical(raw: str) -> str | None:
    """json.dumps(json.loads(raw), ensure_ascii=False) of one string/number/literal token, or None."""
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)
    except ValueError:
        return None


class _Call:
    """One `<tool_call>` body as it arrives: streams the name, then the arguments' canonical tokens."""

    def __init__(self, k: int, id_prefix: str, progressive: bool):
        self.k, self.id = k, f"{id_prefix}{k}"
        self.lex = _Lexer()
        self.step = 0 if progressive else -1  # index into _PREFIX; -1: not streaming (sent whole at the end)
        self.name: str | None = None  # the name read from the prefix
        self.args = ""  # argument text streamed so far
        self.depth = 0
        self.done = False  # the arguments object closed

    def _header(self, name: str) -> dict:
        return {"tool_calls": [{"index": self.k, "id": self.id, "type": "function",
                                "function": {"name": name, "arguments": ""}}]}

    def _piece(self, s: str) -> dict:
        return {"tool_calls": [{"index": self.k, "function": {"arguments": s}}]}

    def feed(self, s: str, out: list) -> None:
        if self.step < 0 or self.done:
            return
        pieces = []
        for kind, raw in self.lex.feed(s):
            if self.step < len(_PREFIX):  # before the arguments: the expected shape, or send it whole later
                want, value = _PREFIX[self.step]
                if kind != want or (want == "str" and not self._key(raw, value)):
                    self.step = -1
                    return
                self.step += 1
                if self.step == len(_PREFIX):
                    out.append(self._header(self.name))
                    pieces.append("{")
                    self.depth = 1
                continue
            if kind in ("{", "["):
                self.depth += 1
                pieces.append(kind)
            elif kind in ("}", "]"):
                self.depth -= 1
                pieces.append(kind)
            elif kind in (",", ":"):
                pieces.append(kind + " ")
            else:
                text = _canonical(raw)
                if text is None:  # not JSON: stop streaming; close() reports it
                    self.done = True
                    break
                pieces.append(text)
            if self.depth == 0:
                self.done = True
                break
        if pieces:
            piece = "".join(pieces)
            self.args += piece
            out.append(self._piece(piece))

    def _key(self, raw: str, value) -> bool:
        """A string token of the prefix: the literal key expected, or (value ...) the function name."""
        try:
            got = json.loads(raw)
        except ValueError:
            return False
        if value is ...:
            self.name = got if got else None
            return bool(got)
        return got == value

    def close(self, body: str | None, id_prefix: str, out: list) -> tuple[dict | None, str | None]:
        call, err = tool_call(body, self.k, id_prefix)
        if err:
            out.append({"error": err, "index": self.k})
            return None, err
        args = call["function"]["arguments"]
        if self.step != len(_PREFIX):  # nothing was streamed: send it whole
            out.append(self._header(call["function"]["name"]))
            if args:
                out.append(self._piece(args))
        elif args.startswith(self.args) and len(args) > len(self.args):
            out.append(self._piece(args[len(self.args):]))
        return call, None


class StreamParser:
    """Incremental `parse` (see the module docstring). feed(piece) -> deltas; close() -> the last
    deltas; .message -> the parsed message (complete after close)."""

    def __init__(self, think_open: bool = False, id_prefix: str = "call_", stream_arguments: bool = True):
        self.think_open, self.id_prefix, self.progressive = think_open, id_prefix, stream_arguments
        self.buf = ""  # text received but not yet consumed
        self.mode = "start"  # start | reasoning | content | call | closed
        self.pend = ""  # consumed text held back: a trailing newline, or whitespace after a call
        self.lead = True  # reasoning: its first newline is still to drop
        self.skip_nl = 0  # content: newlines after </think> still to drop
        self.after_call = False
        self.blank = False  # content after a call has been whitespace only so far
        self.sep = ""  # what was held before the current <tool_call> (given back if it is malformed)
        self.call: _Call | None = None
        self.call_body = ""
        self.k = 0
        self.stopped = False
        self.content: list[str] = []
        self.reasoning: list[str] | None = None
        self.calls: list[dict] = []
        self.errors: list[str] = []

    @property
    def message(self) -> dict:
        return {"role": "assistant", "content": "".join(self.content),
                "reasoning_content": None if self.reasoning is None else "".join(self.reasoning),
                "tool_calls": list(self.calls), "errors": list(self.errors)}

    def feed(self, text: str) -> list[dict]:
        if not isinstance(text, str):
            raise TypeError(f"StreamParser.feed: expected str, got {type(text).__name__}")
        if self.mode == "closed":
            raise ValueError("StreamParser.feed: called after close()")
        out: list[dict] = []
        if not self.stopped:
            self.buf += text
            cut = min((i for i in (self.buf.find(s) for s in STOPS) if i >= 0), default=-1)
            if cut >= 0:
                self.buf, self.stopped = self.buf[:cut], True
            self._run(out, final=False)
        return out

    def close(self) -> list[dict]:
        """End of the output: flush what was held back and finish an open call (unclosed: an error)."""
        out: list[dict] = []
        if self.mode != "closed":
            self._run(out, final=True)
            if self.mode == "content" and not (self.after_call and self.blank):
                self._emit_content(self.pend, out)
            elif self.mode == "reasoning":
                self._emit_reasoning(self.pend, out)
            elif self.mode == "call":
                self._end_call(None, out)
            self.pend, self.mode = "", "closed"
        return out

    # ------------------------------------------------------------------ internals
    def _emit_content(self, s: str, out: list) -> None:
        if s:
            self.content.append(s)
            out.append({"content": s})

    def _emit_reasoning(self, s: str, out: list) -> None:
        if s:
            self.reasoning.append(s)
            out.append({"reasoning_content": s})

    def _take(self, tags, final: bool) -> tuple[str, int]:
        """(text before the first of `tags` or the safe part of the buffer, length of the tag found or 0);
        the returned text and the tag are consumed from the buffer."""
        hits = [(i, t) for i, t in ((self.buf.find(t), t) for t in tags) if i >= 0]
        if hits:
            i, t = min(hits)
            text, self.buf = self.buf[:i], self.buf[i + len(t):]
            return text, len(t)
        n = 0 if final or self.stopped else _held(self.buf, (*tags, *STOPS))
        text, self.buf = self.buf[:len(self.buf) - n], self.buf[len(self.buf) - n:]
        return text, 0

    def _run(self, out: list, final: bool) -> None:
        final = final or self.stopped
        while True:
            if self.mode == "start":
                lead = self.buf.lstrip()
                if not final and (not lead or (THINK.startswith(lead) and lead != THINK)):
                    return  # whitespace or a partial <think> so far: cannot tell yet
                if lead.startswith(THINK):
                    self.buf = lead[len(THINK):]
                self.mode = "reasoning" if lead.startswith(THINK) or self.think_open else "content"
                if self.mode == "reasoning":
                    self.reasoning = []
                continue
            if self.mode == "reasoning":
                text, found = self._take((THINK_END,), final)
                if self.lead and text:
                    text, self.lead = (text[1:] if text.startswith("\n") else text), False
                text, self.pend = self.pend + text, ""
                if found:
                    self._emit_reasoning(text[:-1] if text.endswith("\n") else text, out)
                    self.mode, self.skip_nl = "content", 2
                    continue
                if text.endswith("\n") and not final:
                    text, self.pend = text[:-1], "\n"
                self._emit_reasoning(text, out)
                return
            if self.mode == "content":
                while self.skip_nl and self.buf.startswith("\n"):
                    self.buf, self.skip_nl = self.buf[1:], self.skip_nl - 1
                if self.skip_nl and not self.buf and not final:
                    return
                self.skip_nl = 0
                text, found = self._take((CALL,), final)
                text, self.pend = self.pend + text, ""
                if self.after_call and self.blank and not text.strip():
                    if found:
                        self.sep = text
                    else:
                        self.pend = text
                else:
                    self.blank = False
                    if found:
                        text, self.sep = (text[:-1], "\n") if text.endswith("\n") else (text, "")
                    elif text.endswith("\n") and not final:
                        text, self.pend = text[:-1], "\n"
                    self._emit_content(text, out)
                if not found:
                    return
                self.mode, self.call_body = "call", ""
                self.call = _Call(self.k, self.id_prefix, self.progressive)
                continue
            if self.mode == "call":
                text, found = self._take((CALL_END,), final)
                self.call_body += text
                self.call.feed(text, out)
                if not found:
                    return
                self._end_call(self.call_body, out)
                continue
            return

    def _end_call(self, body: str | None, out: list) -> None:
        call, err = self.call.close(body, self.id_prefix, out)
        if err:
            raw = CALL + self.call_body + ("" if body is None else CALL_END)
            self._emit_content(self.sep + raw, out)
            self.errors.append(err)
        else:
            self.calls.append(call)
        self.k += 1
        self.mode, self.after_call, self.blank, self.sep, self.call = "content", True, True, "", None


def apply_delta(message: dict, delta: dict) -> dict:
    """Merge one delta into an accumulating message dict (what a streaming client does); returns it.
    Start from {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": []}."""
    if "content" in delta:
        message["content"] = (message.get("content") or "") + delta["content"]
    if "reasoning_content" in delta:
        message["reasoning_content"] = (message.get("reasoning_content") or "") + delta["reasoning_content"]
    for tc in delta.get("tool_calls", ()):
        calls = message.setdefault("tool_calls", [])
        mine = next((c for c in calls if c["index"] == tc["index"]), None)
        if mine is None:
            mine = {"index": tc["index"], "id": tc.get("id"), "type": tc.get("type", "function"),
                    "function": {"name": "", "arguments": ""}}
            calls.append(mine)
        fn = tc.get("function", {})
        mine["function"]["name"] += fn.get("name", "")
        mine["function"]["arguments"] += fn.get("arguments", "")
    if "error" in delta:
        message.setdefault("errors", []).append(delta["error"])
    return message
