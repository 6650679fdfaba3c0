"""Held-out evaluation prompts for the SFT'd variants, with what a correct first reply must contain, and
a light scorer for the checks that need no sandbox.

    sft_eval_prompts(n=None, seed=0) -> list of
        {"id", "kind", "messages" (ending with a user turn), "tools" (optional), "expect": {...}}

`kind` and `expect`:
  tool        a call is expected: {"tool_calls": [{"name", "arguments"}], "match": {tool: {arg: rule}}}
              (calculator, lookup, python, multi: several calls in one turn, order-insensitive; recovery:
              the corrected call where the data's first call is a deliberate slip)
  clarify     an ambiguous request: {"tool_calls": [], "question": True} - no call, a question back
  no_tool     tools are offered but not needed: {"tool_calls": []}
  identity    {"keyword": "Mellum"} - the reply names the model
  math        {"answer": "<exact value>", "answer_text": "<as the data writes it>"}, reply form "The answer is X."
  code        {"test_style": "assert"|"stdio", "tests": [...], "entry_point"} - needs a sandbox to score
  json        {"schema": <JSON Schema>} - the reply content (fence stripped) must validate
The Thinking variant must in addition open its reply with <think> and close it before the answer; that
is a property of the rendered text, checked by the evaluator with the chat parser, not here.

`check_reply(item, message)` scores one parsed assistant message (OpenAI shape: content,
reasoning_content, tool_calls) -> {"ok": True/False/None, "reason": str}; None where scoring needs
execution (code, python-tool arguments).
"""
from __future__ import annotations

import json

from . import jsontasks, mathtasks, tools
from .sftdata import apportion, make_item
from .splits import stable_id

EVAL_MIX = (("tool.calculator", 25), ("tool.lookup", 25), ("tool.python", 10), ("tool.multi", 15),
            ("tool.recovery", 10), ("tool.clarify", 12), ("tool.no_tool", 8), ("identity", 30), ("math", 30),
            ("code", 20), ("json", 15))
KINDS = {"tool.calculator": "tool", "tool.lookup": "tool", "tool.python": "tool", "tool.multi": "tool",
         "tool.recovery": "tool", "tool.clarify": "clarify", "tool.no_tool": "no_tool"}


def sft_eval_prompts(n: int | None = None, seed: int = 0) -> list[dict]:
    """Held-out prompts (default 200) cut before the assistant turn their expectation describes (the first
    one, or the identity answer after a greeting), with their expectations."""
    counts = apportion(sum(c for _, c in EVAL_MIX) if n is None else n, EVAL_MIX)
    out = []
    for kind, _ in EVAL_MIX:
        for i in range(counts[kind]):
            it = make_item(kind, "heldout", seed, i, thinking=False, stream="eval:", exact_math=True)
            item = {"id": stable_id(f"{it.key}:{i}", "eval-"), "kind": KINDS.get(kind, kind),
                    "messages": it.messages[:it.prompt_end()], "expect": it.expect}
            if it.tools:
                item["tools"] = it.tools
            out.append(item)
    return out


def _args_match(name: str, want: dict, got: dict, rules: dict) -> bool | None:
    if set(want) != set(got):
        return False
    for arg, w in want.items():
        rule, g = rules.get(arg, "exact"), got[arg]
        if rule == "value":
            try:
                if tools.calculate(str(w)) != tools.calculate(str(g)):
                    return False
            except tools.ToolError:  # no value (1 / 0): the same text, spaces aside
                if "".join(str(w).split()) != "".join(str(g).split()):
                    return False
        elif rule == "text":
            if not isinstance(g, str) or " ".join(g.split()).casefold() != " ".join(str(w).split()).casefold():
                return False
        elif rule == "output":
            return None  # same printed output: needs a sandbox
        elif w != g:
            return False
    return True


def calls_match(expected: list[dict], calls: list[dict], match: dict) -> tuple[bool | None, str]:
    """Expected calls vs OpenAI-shaped tool calls, as multisets (order-insensitive)."""
    got = []
    for c in calls:
        fn = c.get("function", c)
        try:
            args = json.loads(fn["arguments"]) if isinstance(fn.get("arguments"), str) else fn.get("arguments")
        except (json.JSONDecodeError, KeyError):
            return False, "arguments are not valid JSON"
        got.append((fn.get("name"), args))
    if sorted(str(n) for n, _ in got) != sorted(e["name"] for e in expected):
        return False, f"called {[n for n, _ in got]}, expected {[e['name'] for e in expected]}"
    unknown = False
    left = list(got)
    for e in expected:
        hit = None
        for k, (name, args) in enumerate(left):
            ok = name == e["name"] and isinstance(args, dict) and _args_match(name, e["arguments"], args, match.get(name, {}))
            if ok is None:
                unknown, hit = True, k
                break
            if ok:
                hit = k
                break
        if hit is None:
            return False, f"no call matches {e}"
        left.pop(hit)
    return (None if unknown else True), "calls match" + (" (python output not compared)" if unknown else "")


def check_reply(item: dict, message: dict) -> dict:
    """Score one assistant message against an eval item's expectation (see the module docstring)."""
    exp, kind = item["expect"], item["kind"]
    content, calls = message.get("content") or "", message.get("tool_calls") or []
    if kind == "tool":
        names_ok = sorted(c.get("function", c).get("name") for c in calls) == sorted(e["name"] for e in exp["tool_calls"])
        ok, why = calls_match(exp["tool_calls"], calls, exp.get("match", {}))
        return {"ok": ok, "reason": why, "tool_name": names_ok}
    if kind == "clarify":
        ok = not calls and "?" in content
        return {"ok": ok, "reason": "asked back" if ok else "expected a question and no tool call"}
    if kind == "no_tool":
        return {"ok": not calls, "reason": "answered directly" if not calls else "called a tool needlessly"}
    if kind == "identity":
        ok = exp["keyword"].lower() in content.lower()
        return {"ok": ok, "reason": f"{'names' if ok else 'does not name'} {exp['keyword']}"}
    if kind == "math":
        got = mathtasks.extract_answer(content)
        if got is None:
            return {"ok": False, "reason": "no 'The answer is X.' line"}
        return {"ok": _same_number(got, exp["answer"]), "reason": f"answered {got!r}, expected {exp['answer']!r}"}
    if kind == "json":
        import jsonschema  # optional dependency: only needed to score JSON replies

        try:
            jsonschema.validate(json.loads(jsontasks.strip_fence(content)), exp["schema"])
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            return {"ok": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        return {"ok": True, "reason": "valid"}
    return {"ok": None, "reason": "code is scored by running its tests in a sandbox"}


def _same_number(got: str, want: str) -> bool:
    try:
        from math_verify import parse, verify  # optional: the well-kept equivalence check when installed
    except ImportError:
        return got.replace(" ", "").lstrip("x=").lstrip("$") == want
    return bool(verify(parse(f"${want}$"), parse(f"${got}$")))
