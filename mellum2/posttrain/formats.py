"""Readers for SFT data files: every supported format becomes the same normalised conversation.

    read_conversations(path, on_error="raise", stats=None) -> iterator of
        {"messages": [...], "tools": [...] (when present), "source": "<file>:<line>"}
    load_conversations(path, on_error="raise") -> (list, ReadStats)

`path` is a file or a directory (its supported files, recursively, in sorted order). Formats:
- OpenAI chat rows: {"messages": [...], "tools": [...]} (tools optional), one per line of a .jsonl
  (or .jsonl.gz) file, or a .json file holding a JSON array of rows (or JSON Lines);
- ShareGPT-style rows: {"conversations": [{"from", "value"}], "system": ..., "tools": ...}, roles
  human/user, gpt/assistant/model, system, function_call (an assistant tool call: the value is
  {"name", "arguments"} or a list of them, as JSON), observation/function_response/tool (the result of
  the pending call); `role`/`content` keys are accepted in place of `from`/`value`;
- Hugging Face `datasets` (optional dependency): a directory written by `save_to_disk` (its "train"
  split, or its only split), and .parquet / .arrow files read with `load_dataset(<format>,
  data_files=...)`, locally, never from the hub. Rows are in either format above.

Normalised messages: roles system/user/assistant/tool; string content (text parts joined; None only on
an assistant turn with tool calls, made ""); `reasoning_content` (also read from `reasoning`);
tool calls in OpenAI shape with `arguments` a JSON string of an object and a unique `id`; tool messages
with `tool_call_id` and `name` (filled from the pending call when missing). Tools in OpenAI shape.

Bad rows (malformed JSON, an unknown role, missing content, a tool call whose arguments are not an
object, a tool result with no call before it, no assistant turn, ChatML control tokens in the text)
raise `DataFormatError` naming the file, the line (or row) and the field; with on_error="skip" they are
counted in `ReadStats` (with the first few reasons) and reading goes on. Problems with a whole file (not
found, unreadable, `datasets` missing) always raise.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mellum2.errors import MellumError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "system": "system", "function_call": "function_call",
                  "observation": "tool", "function_response": "tool", "function": "tool", "tool": "tool",
                  "tool_response": "tool"}
CONTROL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".arrow")
MAX_REASONS = 20


class DataFormatError(MellumError, ValueError):
    """A row or file that is not a conversation in a supported format; the message names where."""


@dataclass
class ReadStats:
    files: int = 0
    rows: int = 0       # rows read (blank lines not counted)
    kept: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS skip reasons

    def summary(self) -> str:
        text = f"{self.kept} conversations from {self.files} file(s)"
        if self.skipped:
            text += f"; skipped {self.skipped} bad row(s), first: {self.reasons[0]}"
        return text


# ---- one row -----------------------------------------------------------------------------------

def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in value):
        text = "".join(p["text"] for p in value)
    else:
        raise DataFormatError(f"{where}: expected a string (or a list of text parts), got {type(value).__name__}")
    bad = next((t for t in CONTROL if t in text), None)
    if bad:
        raise DataFormatError(f"{where}: holds the control token {bad}, which would forge a turn")
    return text


def _tool_call(c: Any, where: str, index: int, used: set) -> dict:
    if not isinstance(c, dict):
        raise DataFormatError(f"{where}: expected an object, got {type(c).__name__}")
    fn = c.get("function", c)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise DataFormatError(f"{where}.function.name: missing or not a string")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}.function.arguments: not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise DataFormatError(f"{where}.function.arguments: must be a JSON object, got {type(args).__name__}")
    cid = c.get("id") if isinstance(c.get("id"), str) and c.get("id") else f"call_{index}"
    while cid in used:
        cid += "_"
    used.add(cid)
    return {"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _tool(t: Any, where: str) -> dict:
    if isinstance(t, dict) and isinstance(t.get("function"), dict):
        t = t["function"]
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
        raise DataFormatError(f"{where}: expected a function schema with a name")
    return {"type": "function", "function": t}


def normalise(row: Any, where: str) -> dict:
    """One row (OpenAI or ShareGPT) as a normalised conversation, or DataFormatError naming `where`."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs, field_name = row["messages"], "messages"
    elif "conversations" in row:
        msgs, field_name = sharegpt_messages(row, where), "conversations"
    else:
        raise DataFormatError(f"{where}: expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) list")
    if not isinstance(msgs, list) or not msgs:
        raise DataFormatError(f"{where}: {field_name} must be a non-empty list")
    out, used, pending, n_calls = [], set(), [], 0
    for i, m in enumerate(msgs):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataFormatError(f"{at}: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role == "function":  # the legacy OpenAI name for a tool result
            role = "tool"
        if role not in ROLES:
            raise DataFormatError(f"{at}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        msg: dict = {"role": role}
        calls = m.get("tool_calls") if role == "assistant" else None
        if m.get("content") is None:
            if not calls:
                raise DataFormatError(f"{at}.content: missing")
            msg["content"] = ""
        else:
            msg["content"] = _text(m["content"], f"{at}.content")
        if role == "assistant":
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None:
                msg["reasoning_content"] = _text(reasoning, f"{at}.reasoning_content")
            if calls is not None:
                if not isinstance(calls, list):
                    raise DataFormatError(f"{at}.tool_calls: expected a list")
                msg["tool_calls"] = []
                for k, c in enumerate(calls):
                    msg["tool_calls"].append(_tool_call(c, f"{at}.tool_calls[{k}]", n_calls, used))
                    n_calls += 1
                pending = list(msg["tool_calls"])
        elif role == "tool":
            cid = m.get("tool_call_id")
            match = next((c for c in pending if c["id"] == cid), None) if cid else (pending[0] if pending else None)
            if match is None:
                raise DataFormatError(f"{at}: a tool result with no pending tool call"
                                      + (f" of id {cid!r}" if cid else " before it"))
            pending.remove(match)
            msg["tool_call_id"] = match["id"]
            msg["name"] = m["name"] if isinstance(m.get("name"), str) and m["name"] else match["function"]["name"]
        else:
            pending = []
        out.append(msg)
    if not any(m["role"] == "assistant" for m in out):
        raise DataFormatError(f"{where}: no assistant message (nothing to learn from)")
    conv: dict = {"messages": out}
    tools = row.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: tools: not valid JSON ({e.msg})") from None
    if tools:
        if not isinstance(tools, list):
            raise DataFormatError(f"{where}: tools: expected a list")
        conv["tools"] = [_tool(t, f"{where}: tools[{k}]") for k, t in enumerate(tools)]
    conv["source"] = where
    return conv


def sharegpt_messages(row: dict, where: str) -> list[dict]:
    """ShareGPT turns as OpenAI-shaped messages (validated afterwards by `normalise`)."""
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise DataFormatError(f"{where}: conversations must be a list")
    msgs = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row["system"] else []
    for i, t in enumerate(turns):
        at = f"{where}: conversations[{i}]"
        if not isinstance(t, dict):
            raise DataFormatError(f"{at}: expected an object, got {type(t).__name__}")
        who, value = t.get("from", t.get("role")), t.get("value", t.get("content"))
        role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise DataFormatError(f"{at}.from: unknown role {who!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
        if role != "function_call":
            msgs.append({"role": role, "content": value})
            continue
        try:
            calls = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{at}.value: a function_call must be JSON ({e.msg})") from None
        calls = calls if isinstance(calls, list) else [calls]
        if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1].get("tool_calls"):
            msgs[-1]["tool_calls"] = calls  # "gpt" text then its call: one assistant turn
        else:
            msgs.append({"role": "assistant", "content": "", "tool_calls": calls})
    return msgs


# ---- files -------------------------------------------------------------------------------------

def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed row or the JSONDecodeError) for a .jsonl(.gz) / .json file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        head = f.read(4096)
        if path.suffix == ".json" and head.lstrip().startswith("["):
            try:
                rows = json.loads(head + f.read())
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            for i, row in enumerate(rows):
                yield f"{path}: item {i}", row
            return
        f.seek(0)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", DataFormatError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})")


def _datasets():
    try:
        import datasets  # optional dependency (the `datasets` extra)
    except ImportError:
        return None
    return datasets


def _hf_rows(path: Path) -> Iterator[tuple[str, Any]]:
    ds_mod = _datasets()
    if ds_mod is None:
        raise DataFormatError(f"{path}: reading this needs the `datasets` package (pip install 'mellum2[datasets]')")
    if path.is_dir():
        ds = ds_mod.load_from_disk(str(path))
        if isinstance(ds, ds_mod.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise DataFormatError(f"{path}: a dataset dict without a 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        kind = "parquet" if path.suffix == ".parquet" else "arrow"
        ds = ds_mod.load_dataset(kind, data_files=str(path), split="train")
    for i, row in enumerate(ds):
        yield f"{path}: row {i}", row


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or
                              ((path / "state.json").exists() and (path / "dataset_info.json").exists()))


def data_files(path: str | Path) -> list[Path]:
    """The files (or saved-dataset directories) `path` stands for, in reading order."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataFormatError(f"{path}: no such file or directory")
    if path.is_file() or is_saved_dataset(path):
        return [path]
    found, stack = [], [path]
    while stack:
        d = stack.pop()
        for p in sorted(d.iterdir()):
            if is_saved_dataset(p):
                found.append(p)
            elif p.is_dir():
                stack.append(p)
            elif p.name.endswith(SUFFIXES):
                found.append(p)
    if not found:
        raise DataFormatError(f"{path}: no data files ({', '.join(SUFFIXES)}) or saved datasets in this directory")
    return sorted(found)


def read_conversations(path: str | Path, on_error: str = "raise", stats: ReadStats | None = None) -> Iterator[dict]:
    """Normalised conversations from a file or directory; bad rows raise, or are counted in `stats`
    and skipped when on_error="skip"."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else ReadStats()
    for f in data_files(path):
        stats.files += 1
        rows = _hf_rows(f) if f.is_dir() or f.suffix in (".parquet", ".arrow") else _json_rows(f)
        try:
            for where, row in rows:
                stats.rows += 1
                try:
                    if isinstance(row, DataFormatError):
                        raise row
                    conv = normalise(row, where)
                except DataFormatError as e:
                    if on_error == "raise":
                        raise
                    stats.skipped += 1
                    if len(stats.reasons) < MAX_REASONS:
                        stats.reasons.append(str(e))
                    continue
                stats.kept += 1
                yield conv
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise DataFormatError(f"{f}: cannot read ({e.strerror or e})") from None


def load_conversations(path: str | Path, on_error: str = "raise") -> tuple[list[dict], ReadStats]:
    stats = ReadStats()
    return list(read_conversations(path, on_error, stats)), stats
