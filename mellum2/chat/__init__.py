"""mellum2.chat: the chat format of the Instruct and Thinking variants (docs/chat.md).

    from mellum2.chat import render, parse, StreamParser
    text = render(messages, tools=None, add_generation_prompt=True, enable_thinking=True)
    msg = parse(generated_text)          # {"role", "content", "reasoning_content", "tool_calls", "errors"}
    p = StreamParser(); deltas = p.feed(piece); ...; msg = p.finish()

`render` and transformers' `apply_chat_template` on a saved tokenizer give the same string (one Jinja
source, template.jinja); `parse` inverts it for assistant output. Importing this package needs no
CLI, model or tokenizer (`mellum2 chat` lives in cli.py and is imported only by the dispatcher).
"""
from .parser import parse
from .stream import StreamParser, apply_delta
from .template import (TEMPLATE, TEMPLATE_FILE, ChatFormatError, compiled, opens_think, prompt_ids, render,
                       validate)

__all__ = ["render", "validate", "prompt_ids", "opens_think", "parse", "StreamParser", "apply_delta",
           "ChatFormatError", "TEMPLATE", "TEMPLATE_FILE", "compiled"]
