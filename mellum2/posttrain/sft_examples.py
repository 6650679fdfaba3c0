"""SFT examples: one conversation -> token ids and labels for the Instruct or Thinking variant.

    sft_examples(tokenizer, messages, mode, tools=None, max_samples=5) -> [(input_ids, labels), ...]

`labels` is `input_ids` with -100 wherever no loss is taken (the model shifts labels itself, as
transformers does). The text is the chat template's (mellum2.chat.render), so a model trained on
these examples sees at inference exactly the format it was trained on. What carries loss follows the
Mellum 2 report's two recipes:

- instruct: one example per conversation; every assistant turn is trained: its content, its tool
  calls and the `<|im_end|>` that ends it (not the `<|im_start|>assistant\\n` header, not the newline
  after `<|im_end|>`). Reasoning is dropped from every turn (`reasoning_content`, and `<think>` spans
  written inline in the content), so the Instruct model answers directly.
- thinking: only the last assistant turn of an example is trained, with its reasoning. Every
  assistant turn that has reasoning is a possible target; a conversation is unfolded into one example
  per target (the conversation cut after that turn), so each target sees the context it would see at
  inference (earlier turns' reasoning dropped by the template when a user message follows them, kept
  in a tool-calling chain after the last user message). With more targets than `max_samples`, the
  samples are spread evenly over them, always including the last. Conversations with no reasoning
  give no example.

Trailing messages after the last trained turn are left out (they would carry no loss).

Tokenisation: the rendered text is cut where the trained spans begin and end, and each piece is
encoded alone, so a trained turn starts on a token boundary right after its header: the prompt's
tokens are exactly what `tokenizer.encode(render(history, add_generation_prompt=True))` gives at
inference, and the turn's tokens are what the model itself produces (BPE cannot merge the header's
newline into the answer's first token). `decode(input_ids)` is the rendered text.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

from mellum2.chat.template import ASSISTANT_HEADER, render
from mellum2.errors import UsageError

MODES = ("instruct", "thinking")
IGNORE = -100
_END = "<|im_end|>"


def _reasoning(m: Mapping) -> str:
    """The reasoning of an assistant message as the template reads it ('' if none)."""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(m.get(key), str):
            return m[key]
    c = m.get("content")
    if isinstance(c, str) and "</think>" in c:
        return c.split("</think>")[0].split("<think>")[-1].strip("\n")
    return ""


def _without_reasoning(m: Mapping) -> dict:
    m = {k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning")}
    c = m.get("content")
    if isinstance(c, str) and "</think>" in c:
        m["content"] = c.split("</think>")[-1].lstrip("\n")
    return m


def spread(n: int, k: int) -> list[int]:
    """k of range(n) spread evenly, the last always included (all of them if n <= k)."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns of rendered `text`: from after the header through <|im_end|>.

    Unambiguous because message text cannot hold ChatML control tokens (the template's validation)."""
    spans, pos = [], 0
    while (head := text.find(ASSISTANT_HEADER, pos)) >= 0:
        start = head + len(ASSISTANT_HEADER)
        end = text.find(_END, start)
        if end < 0:
            raise AssertionError("sft_examples: an assistant turn of the rendered text has no <|im_end|>")
        spans.append((start, end + len(_END)))
        pos = end
    return spans


def tokenize_spans(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of `text` with loss exactly on the character spans (sorted, disjoint)."""
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for a, b in [*spans, (len(text), len(text))]:
        for lo, hi, trained in ((pos, a, False), (a, b, True)):
            if hi > lo:
                piece = tokenizer.encode(text[lo:hi])
                ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
        pos = b
    return ids, labels


def sft_examples(tokenizer, messages: Sequence[Mapping], mode: str, tools: Sequence[Mapping] | None = None,
                 max_samples: int = 5) -> list[tuple[list[int], list[int]]]:
    """The training examples of one conversation (see the module docstring); [] when it has none.

    Raises ChatFormatError (mellum2.chat) naming the message index and field for messages the
    template cannot render, UsageError for an unknown mode."""
    if mode not in MODES:
        raise UsageError(f"sft_examples: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if max_samples < 1:
        raise UsageError(f"sft_examples: max_samples must be >= 1, got {max_samples}")
    render([*messages], tools)  # validates the whole conversation, also the parts no example keeps
    msgs = [dict(m) for m in copy.deepcopy(list(messages))]
    turns = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
    if mode == "instruct":
        if not turns:
            return []
        msgs = [_without_reasoning(m) if m["role"] == "assistant" else m for m in msgs[:turns[-1] + 1]]
        text = render(msgs, tools)
        return [tokenize_spans(tokenizer, text, assistant_spans(text))]
    targets = [i for i in turns if _reasoning(msgs[i])]
    out = []
    for t in (targets[j] for j in spread(len(targets), max_samples)):
        text = render(msgs[:t + 1], tools)
        out.append(tokenize_spans(tokenizer, text, assistant_spans(text)[-1:]))
    return out
