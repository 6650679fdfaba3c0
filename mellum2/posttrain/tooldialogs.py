"""Tool-use dialogues over the local tools (tools.py), for SFT, and the first-turn expectations that
the held-out evaluation and the RL tool tasks score.

Kinds: a single call (calculator / lookup / python) -> the tool's reply -> the answer, sometimes with a
follow-up question that refers to the first; several calls in one assistant turn; a tool error and the
recovery (`^` or `x` rejected by the calculator and the call retried, a misspelt name corrected after
the lookup's suggestion, an unknown entity or a division by zero explained rather than guessed, a
program that raises); a clarification question when the request is ambiguous (then the user's answer,
the call and the reply); and requests that need no tool although tools are offered.

Each generator returns a `Dialog`: the split key (a fact's key is the same wherever it is asked -
alone, with others in one turn, after a typo - and a dialogue asks only facts of one split), the messages (every assistant turn carries
`reasoning_content`, dropped later for Instruct), the offered tools (always including the needed one,
plus distractors, shuffled), and `expect`, what a correct *first* assistant reply must do:
{"tool_calls": [{"name", "arguments"}], "match": {arg: rule}} or {"tool_calls": [], "question": True}
or {"tool_calls": []}. In the recovery dialogues whose first call is a deliberate slip (`^`, `x`, a
misspelt name), `expect` holds the corrected call: that is what a good first reply would send. Tool responses come from `tools.run_tool`; python outputs are computed here and
checked against a real run by the tests.
"""
from __future__ import annotations

import copy
import datetime
import json
import random
from dataclasses import dataclass, field

from . import tools
from .codebank import WORDS
from .splits import heldout, split_list

SYSTEMS = (None, None, "You are a helpful assistant with access to tools.",
           "You are Mellum 2, a code model trained by JetBrains. Use the tools when they help.",
           "Answer briefly. Call a tool when you need exact numbers or facts.")
# how each argument of each tool is compared by a verifier: value = same calculator result,
# text = equal after trimming and case-folding, exact = JSON equality
MATCH = {"calculator": {"expression": "value"}, "lookup": {"entity": "text", "field": "exact"}, "python": {"code": "output"}}


@dataclass
class Dialog:
    key: str
    kind: str
    messages: list
    tools: list
    expect: dict = field(default_factory=dict)


def call(r: random.Random, name: str, args: dict) -> dict:
    return {"id": f"call_{r.getrandbits(40):010x}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def respond(c: dict, content: str) -> dict:
    return {"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": content}


def run(c: dict) -> str:
    """The tool's reply to a calculator / lookup call."""
    return tools.run_tool(c["function"]["name"], json.loads(c["function"]["arguments"]))


def asst(content: str, reasoning: str, calls: list | None = None) -> dict:
    m = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        m["tool_calls"] = calls
    return m


def toolset(r: random.Random, need: set[str]) -> list:
    names = sorted(need | {n for n in tools.TOOLS if r.random() < 0.6}) or [r.choice(sorted(tools.TOOLS))]
    r.shuffle(names)
    return [copy.deepcopy(tools.TOOLS[n]) for n in names]


def start(r: random.Random, user: str) -> list:
    system = r.choice(SYSTEMS)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def expect_calls(calls: list) -> dict:
    return {"tool_calls": [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                           for c in calls],
            "match": {c["function"]["name"]: MATCH[c["function"]["name"]] for c in calls}}


def part_key(c: dict) -> str:
    """The split key of one call: the same for a fact asked alone, in a multi-call turn or after a slip."""
    args = json.loads(c["function"]["arguments"])
    if c["function"]["name"] == "lookup":
        return f"lookup:{args['entity']}:{args['field']}"
    if c["function"]["name"] == "calculator":
        return f"calc:{args['expression']}"
    return f"python:{args['code']}"


def same_split(a: str, b: str) -> bool:
    return heldout(a) == heldout(b)


def result(reply: str):
    return json.loads(reply).get("result")


# ---- calculator --------------------------------------------------------------------------------

def calc_request(r: random.Random, small: bool = False) -> tuple[str, str]:
    """(request, expression)."""
    if small:
        a, b = r.randint(1, 99), r.randint(1, 99)
        op = r.choice(["+", "-", "*"])
        return r.choice([f"Use the calculator to compute {a} {op} {b}.", f"Please use the calculator: {a} {op} {b}",
                         f"Calculate {a} {op} {b} with the calculator."]), f"{a} {op} {b}"
    kind = r.randrange(6)
    if kind == 0:
        a, b = r.randint(100, 9999), r.randint(12, 999)
        return r.choice([f"What is {a} * {b}?", f"Multiply {a} by {b}.", f"How much is {a} times {b}?"]), f"{a} * {b}"
    if kind == 1:
        xs = [r.randint(100, 9999) for _ in range(r.randint(3, 5))]
        listed = ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"
        return r.choice([f"Add up {listed}.", f"What is the sum of {listed}?"]), " + ".join(map(str, xs))
    if kind == 2:
        p, x = r.choice([7, 12, 15, 18, 23, 35, 65]), r.randint(20, 9999)
        return r.choice([f"What is {p}% of {x}?", f"Compute {p} percent of {x}."]), f"{x} * {p} / 100"
    if kind == 3:
        a, b = r.randint(100, 99999), r.choice([2, 4, 5, 8, 16, 25, 40])
        return r.choice([f"Divide {a} by {b}.", f"What is {a} / {b}?"]), f"{a} / {b}"
    if kind == 4:
        a, k = r.randint(2, 19), r.randint(3, 9)
        return r.choice([f"What is {a} to the power of {k}?", f"Compute {a}**{k}."]), f"{a} ** {k}"
    a, b, c = r.randint(10, 999), r.randint(10, 999), r.randint(3, 99)
    return r.choice([f"What is ({a} + {b}) * {c}?", f"Work out ({a} + {b}) times {c}."]), f"({a} + {b}) * {c}"


def calc_single(r: random.Random, small: bool = False) -> Dialog:
    request, expr = calc_request(r, small)
    c = call(r, "calculator", {"expression": expr})
    reply = run(c)
    value = result(reply)
    msgs = start(r, request) + [
        asst("", f"This needs exact arithmetic: {expr}. I'll use the calculator.", [c]), respond(c, reply),
        asst(r.choice([f"{expr} = {value}.", f"The result is {value}.", f"It comes to {value}."]),
             f"The calculator returned {value}.")]
    return Dialog(f"calc:{expr}", "calculator", msgs, [copy.deepcopy(tools.CALCULATOR)] if small else
                  toolset(r, {"calculator"}), expect_calls([c]))


# ---- lookup ------------------------------------------------------------------------------------

ASK = {
    "creator": (["Who created {e}?", "Who designed the {e} programming language?", "Who is the creator of {e}?"],
                "{e} was created by {v}."),
    "year": (["When did {e} first appear?", "In which year was {e} first released?", "What year did {e} come out?"],
             "{e} first appeared in {v}."),
    "symbol": (["What is the chemical symbol for {e}?", "Which symbol does {e} have in the periodic table?"],
               "The chemical symbol for {e} is {v}."),
    "atomic_number": (["What is the atomic number of {e}?", "How many protons does an atom of {e} have?"],
                      "The atomic number of {e} is {v}."),
    "capital": (["What is the capital of {e}?", "Which city is the capital of {e}?"], "The capital of {e} is {v}."),
    "continent": (["On which continent is {e}?", "Which continent is {e} in?"], "{e} is in {v}."),
    "meaning": (["What does HTTP status {e} mean?", "What is HTTP {e}?", "I got a {e} from the server. What does it mean?"],
                "HTTP {e} means \"{v}\"."),
}


def fact(r: random.Random) -> tuple[str, str]:
    entity = r.choice(list(tools.TABLE))
    return entity, r.choice(list(tools.TABLE[entity]))


def lookup_single(r: random.Random) -> Dialog:
    entity, fld = fact(r)
    asks, say = ASK[fld]
    c = call(r, "lookup", {"entity": entity, "field": fld})
    reply = run(c)
    value = json.loads(reply)["value"]
    msgs = start(r, r.choice(asks).format(e=entity)) + [
        asst("", f"This is a fact about {entity} ({fld.replace('_', ' ')}); the lookup tool has it.", [c]),
        respond(c, reply), asst(say.format(e=entity, v=value), f"The table says {value}.")]
    key = f"lookup:{entity}:{fld}"
    # a follow-up that refers to the first question, about a fact of the same split
    others = [k for k in tools.TABLE if fld in tools.TABLE[k] and k != entity and same_split(f"lookup:{k}:{fld}", key)]
    if others and r.random() < 0.3:
        other = r.choice(others)
        c2 = call(r, "lookup", {"entity": other, "field": fld})
        reply2 = run(c2)
        v2 = json.loads(reply2)["value"]
        msgs += [{"role": "user", "content": r.choice([f"And {other}?", f"What about {other}?", f"Same for {other}, please."])},
                 asst("", f"Same question as before, now for {other}: another lookup of {fld.replace('_', ' ')}.", [c2]),
                 respond(c2, reply2), asst(say.format(e=other, v=v2), f"The table says {v2}.")]
    return Dialog(key, "lookup", msgs, toolset(r, {"lookup"}), expect_calls([c]))


# ---- python ------------------------------------------------------------------------------------

def program(r: random.Random) -> tuple[str, str, str, bool]:
    """(request, code, output, raised): output is stdout, or the exception line when raised."""
    kind = r.randrange(8)
    if kind == 0:
        text, ch = f"{r.choice(WORDS)} {r.choice(WORDS)}", r.choice("aeiorst")
        return (f"How many times does the letter '{ch}' appear in \"{text}\"? Use Python to be sure.",
                f"print({text!r}.count({ch!r}))", str(sum(c == ch for c in text)), False)
    if kind == 1:
        d1 = datetime.date(r.randint(2019, 2025), r.randint(1, 12), r.randint(1, 28))
        d2 = d1 + datetime.timedelta(days=r.randint(5, 400))
        return (f"How many days are there between {d1.isoformat()} and {d2.isoformat()}?",
                f"from datetime import date\nprint((date({d2.year}, {d2.month}, {d2.day}) - date({d1.year}, {d1.month}, {d1.day})).days)",
                str(d2.toordinal() - d1.toordinal()), False)
    if kind == 2:
        n = r.randint(20, 80)
        fib = [0, 1]
        while len(fib) <= n:
            fib.append(fib[-1] + fib[-2])
        return (f"What is Fibonacci number {n} (with F(0) = 0 and F(1) = 1)? Compute it with Python.",
                f"a, b = 0, 1\nfor _ in range({n}):\n    a, b = b, a + b\nprint(a)", str(fib[n]), False)
    if kind == 3:
        xs = [r.randint(0, 30) for _ in range(r.randint(5, 9))]
        return (f"Use Python to sort these numbers and drop duplicates: {', '.join(map(str, xs))}.",
                f"print(sorted(set({xs!r})))", repr(sorted(dict.fromkeys(xs))), False)
    if kind == 4:
        xs, k = [r.randint(1, 12) for _ in range(r.randint(3, 7))], r.randint(2, 5)
        code = f"xs = {xs!r}\nprint([x * {k} for x in xs if x % 2 == 0])"
        return f"What does this print?\n```python\n{code}\n```", code, repr([x * k for x in xs if not x & 1]), False
    if kind == 5:
        a, b = sorted(r.sample(range(1, 60), 2))
        code = f"print(sum(range({a}, {b})))"
        return f"What does this print?\n```python\n{code}\n```", code, str((b - a) * (a + b - 1) // 2), False
    if kind == 6:
        xs, i = [r.randint(0, 9) for _ in range(r.randint(2, 4))], r.randint(4, 9)
        code = f"xs = {xs!r}\nprint(xs[{i}])"
        return f"What does this print?\n```python\n{code}\n```", code, "IndexError: list index out of range", True
    w = r.choice(WORDS)
    code = f"value = {w!r}\nprint(int(value) + 1)"
    return (f"What does this print?\n```python\n{code}\n```", code,
            f"ValueError: invalid literal for int() with base 10: {w!r}", True)


def python_single(r: random.Random) -> Dialog:
    request, code, out, raised = program(r)
    c = call(r, "python", {"code": code})
    reply = json.dumps({"error": out} if raised else {"stdout": out + "\n"})
    if raised:
        final = (f"It does not print anything: the program stops with `{out}`. "
                 + ("The list is shorter than the index." if out.startswith("IndexError") else
                    "The string is not a number, so `int()` cannot convert it."))
        thought = f"The program raised {out.split(':')[0]}; I'll explain why."
    else:
        final = r.choice([f"It prints `{out}`.", f"The output is:\n```\n{out}\n```", f"The answer is {out}."])
        thought = f"The program printed {out}."
    msgs = start(r, request) + [asst("", "Running the code is the reliable way to get this. I'll use the python tool.", [c]),
                                respond(c, reply), asst(final, thought)]
    return Dialog(f"python:{code}", "python", msgs, toolset(r, {"python"}), expect_calls([c]))


# ---- errors and recovery -----------------------------------------------------------------------

NOT_IN_TABLE = ("Zig", "Dart", "Haskell", "COBOL", "Iceland", "Thailand", "platinum", "neon")


def recovery(r: random.Random) -> Dialog:
    kind = r.randrange(5)
    if kind in (0, 1):  # the calculator refuses ^ or x; retry with the Python operator
        a, b, c0 = r.randint(2, 30), r.randint(2, 9), r.randint(2, 99)
        said, fixed = (f"{a}^{b}", f"{a} ** {b}") if kind == 0 else (f"{a} x {c0} + {b}", f"{a} * {c0} + {b}")
        bad, good = call(r, "calculator", {"expression": said}), call(r, "calculator", {"expression": fixed})
        err, ok = run(bad), run(good)
        msgs = start(r, r.choice([f"What is {said}?", f"Compute {said}."])) + [
            asst("", f"I'll evaluate {said} with the calculator.", [bad]), respond(bad, err),
            asst("", f"The calculator rejected it: {json.loads(err)['error']}. I'll write it as {fixed}.", [good]),
            respond(good, ok), asst(f"{said} = {result(ok)}.", f"Now it worked: {result(ok)}.")]
        return Dialog(f"calc:{fixed}", "recovery", msgs, toolset(r, {"calculator"}), expect_calls([good]))
    if kind == 2:  # a misspelt name: the lookup suggests the right one
        entity = r.choice([e for e in tools.LANGUAGES if len(e) >= 4] + [e for e in tools.ELEMENTS if len(e) >= 4])
        i = r.randrange(1, len(entity) - 2)
        typo = entity[:i] + entity[i + 1] + entity[i] + entity[i + 2:]
        fld = r.choice(list(tools.TABLE[entity]))
        bad, good = call(r, "lookup", {"entity": typo, "field": fld}), call(r, "lookup", {"entity": entity, "field": fld})
        err, ok = run(bad), run(good)
        if "did you mean" not in err or entity not in err:
            return recovery(r)
        value = json.loads(ok)["value"]
        msgs = start(r, ASK[fld][0][0].format(e=typo)) + [
            asst("", f"I'll look up {typo} ({fld.replace('_', ' ')}).", [bad]), respond(bad, err),
            asst("", f"No entry for {typo}; the table suggests {entity}, which is surely what was meant.", [good]),
            respond(good, ok), asst(ASK[fld][1].format(e=entity, v=value) + f" (I read \"{typo}\" as {entity}.)",
                                    f"The table says {value}.")]
        return Dialog(f"lookup:{entity}:{fld}", "recovery", msgs, toolset(r, {"lookup"}), expect_calls([good]))
    if kind == 3:  # not in the table: say so, do not guess
        entity = r.choice(NOT_IN_TABLE)
        fld = {"Iceland": "capital", "Thailand": "capital", "platinum": "symbol", "neon": "atomic_number"}.get(entity, "creator")
        bad = call(r, "lookup", {"entity": entity, "field": fld})
        err = run(bad)
        msgs = start(r, ASK[fld][0][0].format(e=entity)) + [
            asst("", f"I'll look up {entity}.", [bad]), respond(bad, err),
            asst(f"My reference table has no entry for {entity}, so I can't look up its "
                 f"{fld.replace('_', ' ')} reliably.", "The lookup failed; better to say so than to guess.")]
        return Dialog(f"lookup:{entity}:{fld}", "recovery", msgs, toolset(r, {"lookup"}), expect_calls([bad]))
    a, b = r.randint(10, 999), r.randint(1, 50)  # division by zero: explain
    expr = f"{a} / ({b} - {b})"
    bad = call(r, "calculator", {"expression": expr})
    err = run(bad)
    msgs = start(r, f"What is {expr}?") + [
        asst("", f"I'll evaluate {expr}.", [bad]), respond(bad, err),
        asst(f"It has no value: {b} - {b} = 0, and division by zero is undefined.", "The denominator is zero.")]
    return Dialog(f"calc:{expr}", "recovery", msgs, toolset(r, {"calculator"}), expect_calls([bad]))


# ---- several calls in one turn -----------------------------------------------------------------

def multi(r: random.Random) -> Dialog:
    kind = r.randrange(3)
    if kind == 0:  # the same fact for 2-3 entities
        fld = r.choice(["capital", "symbol", "creator", "year", "atomic_number"])
        ents = r.sample(sorted(k for k in tools.TABLE if fld in tools.TABLE[k]), r.randint(2, 3))
        calls = [call(r, "lookup", {"entity": e, "field": fld}) for e in ents]
        named = ", ".join(ents[:-1]) + f" and {ents[-1]}"
        request = {"capital": f"What are the capitals of {named}?", "symbol": f"Give me the chemical symbols of {named}.",
                   "creator": f"Who created {named}?", "year": f"When did {named} first appear?",
                   "atomic_number": f"What are the atomic numbers of {named}?"}[fld]
        replies = [run(c) for c in calls]
        answer = " ".join(ASK[fld][1].format(e=e, v=json.loads(x)["value"]) for e, x in zip(ents, replies))
    elif kind == 1:
        (q1, e1), (q2, e2) = calc_request(r), calc_request(r)
        calls = [call(r, "calculator", {"expression": e}) for e in (e1, e2)]
        request = f"Two things: {q1[0].lower() + q1[1:]} And {q2[0].lower() + q2[1:]}"
        replies = [run(c) for c in calls]
        answer = f"{e1} = {result(replies[0])}, and {e2} = {result(replies[1])}."
    else:
        entity, fld = fact(r)
        q, expr = calc_request(r)
        calls = [call(r, "lookup", {"entity": entity, "field": fld}), call(r, "calculator", {"expression": expr})]
        request = f"{ASK[fld][0][0].format(e=entity)} Also, {q[0].lower() + q[1:]}"
        replies = [run(c) for c in calls]
        answer = f"{ASK[fld][1].format(e=entity, v=json.loads(replies[0])['value'])} And {expr} = {result(replies[1])}."
    keys = [part_key(c) for c in calls]
    if not all(same_split(k, keys[0]) for k in keys):  # every fact asked belongs to one split
        return multi(r)
    names = {c["function"]["name"] for c in calls}
    msgs = start(r, request) + [asst("", f"There are {len(calls)} independent things to fetch, so I'll make "
                                         f"{len(calls)} calls at once.", calls)]
    msgs += [respond(c, x) for c, x in zip(calls, replies)]
    msgs.append(asst(answer, "All calls returned; I'll combine the results."))
    return Dialog(keys[0], "multi", msgs, toolset(r, names), expect_calls(calls))


# ---- clarification and no-tool requests --------------------------------------------------------

AMBIGUOUS = (  # (request, clarifying question, what the answer supplies)
    ("Who created it?", "Which programming language do you mean?", "creator"),
    ("When did it first come out?", "Which programming language are you asking about?", "year"),
    ("What's the capital?", "Which country's capital would you like to know?", "capital"),
    ("Can you tell me the symbol?", "Which chemical element do you mean?", "symbol"),
    ("What does that status code mean?", "Which HTTP status code did you get?", "meaning"),
    ("Calculate the total for me.", "Which numbers should I add up?", "sum"),
    ("Run my code, please.", "Sure, could you paste the code you want me to run?", "code"),
    ("What's its atomic number?", "Which element do you mean?", "atomic_number"),
    ("Which continent is it on?", "Which country do you mean?", "continent"),
    ("Work out the percentage.", "Which percentage of which number should I compute?", "percent"),
    ("Who made that language?", "Which language are you asking about?", "creator"),
    ("What year was it released?", "Which programming language do you mean?", "year"),
    ("Capital city, please.", "Of which country?", "capital"),
    ("Look that up for me.", "What would you like me to look up?", "capital"),
    ("How much is it altogether?", "Which amounts should I add together?", "sum"),
    ("What's the chemical symbol?", "For which element?", "symbol"),
    ("What's the error code meaning?", "Which HTTP status code do you mean?", "meaning"),
    ("Can you execute this for me?", "There is no code in your message yet. Could you paste it?", "code"),
    ("Which continent?", "Which country are you asking about?", "continent"),
    ("Find out who invented it.", "Which programming language do you mean?", "creator"),
)


def _followup(r: random.Random, need: str):
    """(the user's clarification, the call it allows, the python output or None, the final reply maker)."""
    if need in ("sum", "percent"):
        if need == "sum":
            xs = [r.randint(2, 500) for _ in range(r.randint(2, 4))]
            answer, expr = ", ".join(map(str, xs)) + ".", " + ".join(map(str, xs))
        else:
            p, x = r.choice([10, 15, 20, 25]), r.randint(20, 900)
            answer, expr = f"{p}% of {x}.", f"{x} * {p} / 100"
        return answer, call(r, "calculator", {"expression": expr}), None, lambda reply: f"{expr} = {result(reply)}."
    if need == "code":
        _, code, out, raised = program(r)
        while raised:
            _, code, out, raised = program(r)
        return f"```python\n{code}\n```", call(r, "python", {"code": code}), out, lambda reply: f"It prints `{out}`."
    entity = r.choice([k for k in tools.TABLE if need in tools.TABLE[k]])
    answer = r.choice([f"{entity}.", f"I mean {entity}.", entity])
    return (answer, call(r, "lookup", {"entity": entity, "field": need}), None,
            lambda reply: ASK[need][1].format(e=entity, v=json.loads(reply)["value"]))


def clarify(r: random.Random, split: str) -> Dialog:
    request, question, need = r.choice(split_list(AMBIGUOUS, split))
    msgs = start(r, request) + [asst(question, "The request does not say what it refers to, so I should ask "
                                               "instead of guessing.")]
    answer, c, out, done = _followup(r, need)
    while heldout(part_key(c)) != (split == "heldout"):  # the fact asked after clarifying: same split
        answer, c, out, done = _followup(r, need)
    name = c["function"]["name"]
    reply = json.dumps({"stdout": out + "\n"}) if name == "python" else run(c)
    msgs += [{"role": "user", "content": answer}, asst("", f"Now it is clear; I'll call {name}.", [c]),
             respond(c, reply), asst(done(reply), "I have the result.")]
    return Dialog(f"clarify:{request}:{c['function']['arguments']}", "clarify", msgs,
                  toolset(r, {name}), {"tool_calls": [], "question": True})


NO_TOOL = (
    ("Hi!", "Hello! How can I help you today?"),
    ("Thanks, that's all I needed.", "You're welcome! Happy coding."),
    ("In one sentence, what is a list comprehension?",
     "A list comprehension builds a new list from an iterable in one expression, like `[x * x for x in xs if x > 0]`."),
    ("What does Python's `len` function do?", "`len(x)` returns the number of items in a container such as a list, "
     "string or dict."),
    ("What is a KeyError?", "A KeyError is raised when you look up a key that is not in a dict."),
    ("Say hello in French.", "Bonjour !"),
    ("Is a tuple mutable?", "No. A tuple cannot be changed after it is created; use a list if you need to modify it."),
    ("What's the difference between `==` and `is` in Python?",
     "`==` compares values, while `is` checks whether two names refer to the very same object."),
    ("Good morning!", "Good morning! What can I do for you?"),
    ("What does `git status` show?", "It shows which files are staged, modified or untracked in your working tree."),
    ("Can you recommend a name for a variable holding a user's age?", "`user_age` is clear and follows Python's "
     "snake_case convention."),
    ("What is recursion, briefly?", "Recursion is when a function solves a problem by calling itself on a smaller "
     "version of the same problem."),
)


def no_tool(r: random.Random, split: str) -> Dialog:
    request, reply = r.choice(split_list(NO_TOOL, split))
    msgs = start(r, request) + [asst(reply, "This needs no tool; I can answer directly.")]
    return Dialog(f"notool:{request}", "no_tool", msgs, toolset(r, set()), {"tool_calls": []})
