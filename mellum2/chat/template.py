"""The chat template: one Jinja source (template.jinja), validated input, rendered like transformers.

`render(messages, tools=None, add_generation_prompt=False, enable_thinking=True)` returns exactly the
string `AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, tools=tools, tokenize=False,
add_generation_prompt=..., enable_thinking=...)` returns for any tokenizer directory mellum2 saved
(`Tokenizer.save` writes the same source as `chat_template.jinja` and into `tokenizer_config.json`).
Both run the one file through the same kind of Jinja environment: transformers' settings
(`ImmutableSandboxedEnvironment`, trim_blocks, lstrip_blocks, loop controls, `tojson` as
`json.dumps(..., ensure_ascii=False)`, `raise_exception`, `strftime_now`) and the same template
variables (the special-token strings it passes besides the messages). A test renders a suite of
conversations both ways.

The format (ChatML turns, Qwen3-style `<think>` reasoning kept only after the last user message,
Hermes-style `<tool_call>` JSON, tool results grouped in one user turn) is described in docs/chat.md.

Before rendering, `validate` checks the messages and tools and raises `ChatFormatError` naming the
message index and field (`messages[3].tool_calls[0].function.arguments: ...`): unknown roles, content
of the wrong type or holding ChatML control tokens, tool calls without a name or whose arguments are
not a JSON object, tool results with no call before them. The template raises too (unknown role,
non-object arguments) so transformers users get an error rather than a silently wrong prompt.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment

from mellum2.errors import MellumError

TEMPLATE_FILE = Path(__file__).with_name("template.jinja")
TEMPLATE: str = TEMPLATE_FILE.read_text(encoding="utf-8")
ROLES = ("system", "user", "assistant", "tool")
# ChatML delimiters and the document end: message text holding one of these would forge a turn
CONTROL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
# what transformers passes to the template besides the messages (the tokenizer's special_tokens_map,
# from Tokenizer.hf_config); passed by render too so the two environments see the same variables
TEMPLATE_VARS = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<fim_pad>"}
ASSISTANT_HEADER = "<|im_start|>assistant\n"


class ChatFormatError(MellumError, ValueError):
    """Messages or tools the template cannot render; the message names the index and field."""


def _raise(message: str):
    raise ChatFormatError(message)


@lru_cache(maxsize=4)
def compiled(source: str = TEMPLATE):
    """The template compiled in an environment configured as transformers' (see the docstring)."""
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None, add_generation_prompt: bool = False,
           enable_thinking: bool = True, **kwargs) -> str:
    """The conversation as the model sees it. `messages` are OpenAI-shaped dicts (role, content,
    reasoning_content, tool_calls, tool_call_id); `tools` OpenAI tool dicts or bare function schemas.

    add_generation_prompt: end with an open assistant turn; with enable_thinking=False that turn starts
    with an empty, closed think span (the model answers without reasoning). Extra keyword arguments
    reach the template as variables, as in transformers."""
    validate(messages, tools)
    return compiled().render(messages=list(messages), tools=None if tools is None else list(tools),
                             add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                             **{**TEMPLATE_VARS, **kwargs})


def prompt_ids(tokenizer, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
               enable_thinking: bool = True) -> list[int]:
    """Token ids of the prompt for the next assistant turn (render with add_generation_prompt=True).

    Special-token strings are encoded as their ids: validate() has rejected ChatML control tokens in
    message text, and `<think>`/`<tool_call>` in text are meant as the tokens."""
    return tokenizer.encode(render(messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking))


def opens_think(prompt: str) -> bool:
    """True if `prompt` ends inside an open think span (its last assistant turn opened `<think>` and
    did not close it): the output then starts as reasoning (`parse(text, think_open=True)`)."""
    head = prompt.rfind(ASSISTANT_HEADER)
    if head < 0:
        return False
    turn = prompt[head + len(ASSISTANT_HEADER):]
    return turn.rfind("<think>") > turn.rfind("</think>")


# ---------------------------------------------------------------------------------------- validation
def _kind(x: Any) -> str:
    return "null" if x is None else {str: "a string", bool: "a boolean", int: "a number", float: "a number",
                                     list: "a list", tuple: "a list", dict: "an object"}.get(type(x), type(x).__name__)


def _text(value: Any, where: str, allow_none: bool, allow_json: bool = False) -> str:
    """The text of a content field (string or list of text parts); raises naming `where`."""
    if value is None:
        if allow_none:
            return ""
        raise ChatFormatError(f"{where}: missing (expected a string or a list of text parts)")
    if isinstance(value, str):
        text = value
    elif isinstance(value, Mapping) and allow_json:
        _json(value, where)
        return ""
    elif isinstance(value, (list, tuple)):
        parts = []
        for i, part in enumerate(value):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatFormatError(f"{where}[{i}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported, "
                                      f"got {_kind(part)}{' of type ' + repr(part.get('type')) if isinstance(part, Mapping) else ''}")
            parts.append(part["text"])
        text = "".join(parts)
    else:
        raise ChatFormatError(f"{where}: expected a string or a list of text parts, got {_kind(value)}")
    _no_control(text, where)
    return text


def _no_control(text: str, where: str) -> None:
    for tok in CONTROL:
        if tok in text:
            raise ChatFormatError(f"{where}: holds the control token {tok} (message text cannot open or close turns)")


def _json(value: Any, where: str) -> None:
    """A value the template writes with tojson: serialisable, and no control token in its text."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ChatFormatError(f"{where}: not JSON-serialisable ({e})") from None
    _no_control(text, where)


def _arguments(args: Any, where: str) -> None:
    if isinstance(args, str):
        _no_control(args, where)
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"{where}: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(args, Mapping):
        raise ChatFormatError(f"{where}: expected a JSON object, got {_kind(args)}")
    _json(args, where)


def _tool_calls(calls: Any, where: str) -> list[str | None]:
    """Checks an assistant message's tool_calls; returns their ids (None where absent)."""
    if not isinstance(calls, (list, tuple)):
        raise ChatFormatError(f"{where}: expected a list of tool calls, got {_kind(calls)}")
    ids = []
    for j, call in enumerate(calls):
        w = f"{where}[{j}]"
        if not isinstance(call, Mapping):
            raise ChatFormatError(f"{w}: expected an object, got {_kind(call)}")
        if call.get("type", "function") != "function":
            raise ChatFormatError(f"{w}.type: only 'function' tool calls are supported, got {call.get('type')!r}")
        fn, fw = (call["function"], f"{w}.function") if "function" in call else (call, w)
        if not isinstance(fn, Mapping):
            raise ChatFormatError(f"{fw}: expected an object with name and arguments, got {_kind(fn)}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"{fw}.name: expected a non-empty string, got {_kind(fn.get('name'))}")
        _no_control(fn["name"], f"{fw}.name")
        if "arguments" not in fn:
            raise ChatFormatError(f"{fw}.arguments: missing (expected a JSON object, or {{}} for none)")
        _arguments(fn["arguments"], f"{fw}.arguments")
        ids.append(call.get("id"))
    return ids


def validate(messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None) -> None:
    """Raise ChatFormatError (naming the index and field) unless the template can render these."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"messages: expected a list of message objects, got {_kind(messages)}")
    if not messages:
        raise ChatFormatError("messages: empty (give at least one message)")
    if tools is not None:
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
            raise ChatFormatError(f"tools: expected a list of tool objects, got {_kind(tools)}")
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise ChatFormatError(f"tools[{i}]: expected an object (a JSON schema), got {_kind(tool)}")
            fn = tool.get("function", tool)
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ChatFormatError(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} "
                                      f"or a function schema with a name")
            _json(tool, f"tools[{i}]")
    open_calls: list[str | None] = []  # the calls of the last assistant turn that tool results answer
    for i, m in enumerate(messages):
        w = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"{w}: expected an object with role and content, got {_kind(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{w}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "assistant":
            _text(m.get("content"), f"{w}.content", allow_none=True)
            for key in ("reasoning_content", "reasoning"):
                if m.get(key) is not None:
                    if not isinstance(m[key], str):
                        raise ChatFormatError(f"{w}.{key}: expected a string, got {_kind(m[key])}")
                    _text(m[key], f"{w}.{key}", allow_none=False)
            calls = m.get("tool_calls")
            open_calls = [] if calls is None else _tool_calls(calls, f"{w}.tool_calls")
        elif role == "tool":
            if not open_calls:
                raise ChatFormatError(f"{w}: a tool result with no tool call before it (expected an assistant "
                                      f"message with tool_calls, then one tool message per call)")
            got = m.get("tool_call_id")
            if got is not None and got in open_calls:
                open_calls.remove(got)
            elif got is None or None in open_calls:
                open_calls.pop(0)  # results without ids answer the calls in order
            else:
                raise ChatFormatError(f"{w}.tool_call_id: {got!r} answers none of the unanswered calls "
                                      f"({', '.join(repr(c) for c in open_calls)})")
            _text(m.get("content"), f"{w}.content", allow_none=False, allow_json=True)
        else:
            _text(m.get("content"), f"{w}.content", allow_none=False)
            open_calls = []
