"""Mellum 2's special tokens: one fixed table of (id, string, special flag) for ids 0..32.

The released Mellum 2 tokenizer pins only a few ids publicly (docs/mellum2.md §2): bos 0,
`<think>` 23, `</think>` 24, `<|im_start|>` 27, `<|im_end|>` 28 (the eos), `<tool_call>` 29,
`</tool_call>` 30, `<tool_response>` 31, `</tool_response>` 32. The rest of the low ids are our
decision: ids 0-18 follow StarCoder's layout (whose spellings Mellum uses for FIM), so `<|endoftext|>`
is 0 (the bos), the FIM tokens are 1-4 and `<filename>` (the file separator, a stop string in Mellum's
FIM template) is 5; the free ids 19-22 and 25-26 are `<|reserved_N|>` placeholders so later formats
can claim them without shifting the vocabulary.

`special` follows the released model: think and tool tokens are added tokens with special=false, so
`decode(..., skip_special_tokens=True)` keeps them (a reasoning or tool-call parser needs to see them).
Every entry is a single id and is matched as a whole in text by `Tokenizer.encode(allow_special=True)`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialToken:
    id: int
    content: str
    name: str  # attribute stem on Tokenizer: `<name>_id`
    special: bool = True  # False: an added token that skip_special_tokens keeps


SPECIAL_TOKENS: tuple[SpecialToken, ...] = (
    SpecialToken(0, "<|endoftext|>", "eot"),  # also the bos (id 0, as in the released config)
    SpecialToken(1, "<fim_prefix>", "fim_prefix"),
    SpecialToken(2, "<fim_middle>", "fim_middle"),
    SpecialToken(3, "<fim_suffix>", "fim_suffix"),
    SpecialToken(4, "<fim_pad>", "fim_pad"),  # also the padding id of packed rows
    SpecialToken(5, "<filename>", "file_sep"),  # separates files of one repository
    SpecialToken(6, "<gh_stars>", "gh_stars"),
    SpecialToken(7, "<issue_start>", "issue_start"),
    SpecialToken(8, "<issue_comment>", "issue_comment"),
    SpecialToken(9, "<issue_closed>", "issue_closed"),
    SpecialToken(10, "<jupyter_start>", "jupyter_start"),
    SpecialToken(11, "<jupyter_text>", "jupyter_text"),
    SpecialToken(12, "<jupyter_code>", "jupyter_code"),
    SpecialToken(13, "<jupyter_output>", "jupyter_output"),
    SpecialToken(14, "<empty_output>", "empty_output"),
    SpecialToken(15, "<commit_before>", "commit_before"),
    SpecialToken(16, "<commit_msg>", "commit_msg"),
    SpecialToken(17, "<commit_after>", "commit_after"),
    SpecialToken(18, "<reponame>", "reponame"),
    SpecialToken(19, "<|reserved_19|>", "reserved_19"),
    SpecialToken(20, "<|reserved_20|>", "reserved_20"),
    SpecialToken(21, "<|reserved_21|>", "reserved_21"),
    SpecialToken(22, "<|reserved_22|>", "reserved_22"),
    SpecialToken(23, "<think>", "think", special=False),
    SpecialToken(24, "</think>", "think_end", special=False),
    SpecialToken(25, "<|reserved_25|>", "reserved_25"),
    SpecialToken(26, "<|reserved_26|>", "reserved_26"),
    SpecialToken(27, "<|im_start|>", "im_start"),
    SpecialToken(28, "<|im_end|>", "im_end"),  # the eos of the released model
    SpecialToken(29, "<tool_call>", "tool_call", special=False),
    SpecialToken(30, "</tool_call>", "tool_call_end", special=False),
    SpecialToken(31, "<tool_response>", "tool_response", special=False),
    SpecialToken(32, "</tool_response>", "tool_response_end", special=False),
)

BOS_ID = 0
EOS_ID = 28
PAD_ID = 4
NUM_SPECIAL = len(SPECIAL_TOKENS)  # ids below this are never produced by BPE merges


def _check_table() -> None:
    ids = [t.id for t in SPECIAL_TOKENS]
    if ids != list(range(len(ids))):
        raise AssertionError(f"special.py: SPECIAL_TOKENS ids must be 0..{len(ids) - 1} in order, got {ids}")
    if len({t.content for t in SPECIAL_TOKENS}) != len(ids) or len({t.name for t in SPECIAL_TOKENS}) != len(ids):
        raise AssertionError("special.py: SPECIAL_TOKENS contents and names must be unique")


def special_ids() -> dict[str, int]:
    """name -> id for every special token, e.g. {'eot': 0, 'fim_prefix': 1, ..., 'im_end': 28}."""
    _check_table()
    return {t.name: t.id for t in SPECIAL_TOKENS}
