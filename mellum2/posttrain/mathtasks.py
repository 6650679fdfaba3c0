"""Arithmetic and word problems with step-by-step solutions, for SFT (reasoning traces) and RL (exact
answers).

Three difficulty levels. Level 1 and 2 are small families written here (one-digit sums, two-digit
sums and products, one-step equations, short word problems) so that a demo-sized model has something
it can learn; level 3 reuses the worked problems of the pre-training math generator
(`mellum2.data.mathgen`: long arithmetic, fractions, percentages, linear equations, sequences and word
problems), keeping the families whose answer is a single number.

The answer form, in every assistant reply: the last line of the content is

    The answer is <answer>.

`extract_answer(text)` returns <answer> (or None); RL verifiers compare it with the task's `answer`
using math-verify, which treats "x = 5" and "5", or "7/2" and "3.5", as equal.

Split key: the operation and its operands (`add:3:4` for every phrasing of 3 + 4, word problems
included), or the statement for the mathgen families, so a held-out sum never appears in train.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from mellum2.data import mathgen

from .splits import draw, rng

ANSWER_RE = re.compile(r"^\s*The answer is\s+(.+?)\.?\s*$")
ANSWER_INSTRUCTION = 'End your reply with a line of the form "The answer is <answer>."'


@dataclass(frozen=True)
class MathProblem:
    family: str
    key: str
    statement: str
    steps: tuple[str, ...]
    answer: str           # as the problem's solution writes it: "7", "x = 5", "$12.50", "360 km"
    value: str            # the bare exact value, stated in the answer line: "7", "5", "12.50", "360"
                          # (compound answers of SFT-only families stay as written: "7 remainder 3")
    difficulty: int


def extract_answer(text: str) -> str | None:
    """<answer> from the last non-empty line "The answer is <answer>.", else None."""
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    m = ANSWER_RE.match(lines[-1]) if lines else None
    return m.group(1).strip() if m else None


def final_line(answer: str) -> str:
    return f"The answer is {answer}."


def _bare(answer: str) -> str:
    """'x = 5' -> '5', '$12.50' -> '12.50', '360 km' -> '360', '7/2 hours' -> '7/2'."""
    m = re.search(r"-?\d+(?:[./]\d+)?", answer.replace("$", ""))
    assert m, answer
    return m.group(0)


def _ask(r, expr: str) -> str:
    return r.choice([f"What is {expr}?", f"Compute {expr}.", f"{expr} = ?", f"Calculate {expr}.",
                     f"What does {expr} equal?"])


def add1(r):
    a, b = r.randint(0, 9), r.randint(0, 9)
    return "add", (a, b), _ask(r, f"{a} + {b}"), [f"{a} + {b} = {a + b}."], str(a + b)


def sub1(r):
    a, b = sorted((r.randint(0, 9), r.randint(0, 9)), reverse=True)
    return "sub", (a, b), _ask(r, f"{a} - {b}"), [f"{a} - {b} = {a - b}."], str(a - b)


def mul1(r):
    a, b = r.randint(2, 9), r.randint(2, 9)
    return "mul", (a, b), _ask(r, f"{a} * {b}"), [f"{a} * {b} = {a * b}."], str(a * b)


def add2(r):
    a, b = r.randint(10, 99), r.randint(10, 99)
    tens, ones = b // 10 * 10, b % 10
    return "add", (a, b), _ask(r, f"{a} + {b}"), [f"{a} + {tens} = {a + tens}.", f"{a + tens} + {ones} = {a + b}."], str(a + b)


def sub2(r):
    a, b = sorted((r.randint(10, 99), r.randint(10, 99)), reverse=True)
    tens, ones = b // 10 * 10, b % 10
    return "sub", (a, b), _ask(r, f"{a} - {b}"), [f"{a} - {tens} = {a - tens}.", f"{a - tens} - {ones} = {a - b}."], str(a - b)


def mul21(r):
    a, b = r.randint(11, 99), r.randint(2, 9)
    tens, ones = a // 10 * 10, a % 10
    return "mul", (a, b), _ask(r, f"{a} * {b}"), [f"{tens} * {b} = {tens * b}.", f"{ones} * {b} = {ones * b}.",
                                                 f"{tens * b} + {ones * b} = {a * b}."], str(a * b)


def lin1(r):
    x, b = r.randint(0, 20), r.randint(1, 20)
    return "lin", (1, b, x + b), f"Solve for x: x + {b} = {x + b}.", [f"x = {x + b} - {b} = {x}."], f"x = {x}"


def lin2(r):
    a, x, b = r.randint(2, 9), r.randint(-10, 12), r.randint(1, 30)
    c = a * x + b
    return "lin", (a, b, c), f"Solve for x: {a}x + {b} = {c}.", [f"{a}x = {c} - {b} = {c - b}.", f"x = {c - b} / {a} = {x}."], f"x = {x}"


def word_more(r):
    name, (one, many) = r.choice(mathgen.NAMES), r.choice(mathgen.ITEMS)
    a, b = r.randint(1, 9), r.randint(1, 9)
    q = f"{name} has {a} {one if a == 1 else many} and gets {b} more. How many {many} does {name} have now?"
    return "add", (a, b), q, [f"{name} starts with {a} and gets {b} more: {a} + {b} = {a + b}."], str(a + b)


def word_left(r):
    name, (one, many) = r.choice(mathgen.NAMES), r.choice(mathgen.ITEMS)
    a, b = sorted((r.randint(1, 20), r.randint(1, 20)), reverse=True)
    q = f"{name} had {a} {one if a == 1 else many} and gave away {b}. How many are left?"
    return "sub", (a, b), q, [f"{a} - {b} = {a - b}."], str(a - b)


def word_groups(r):
    name, (one, many) = r.choice(mathgen.NAMES), r.choice(mathgen.ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 12)
    q = f"{name} buys {a} boxes with {b} {many} in each box. How many {many} is that in total?"
    return "mul", (a, b), q, [f"{a} boxes of {b}: {a} * {b} = {a * b}."], str(a * b)


LEVEL1 = (add1, sub1, word_more)
LEVEL2 = (add2, sub2, mul1, mul21, lin1, lin2, word_left, word_groups)
# mathgen families whose answer is one number (a "remainder", a pair or a list would not be exact)
LEVEL3 = (mathgen.addition, mathgen.subtraction, mathgen.product, mathgen.fractions, mathgen.percentage,
          mathgen.linear, mathgen.geom_seq, mathgen.word_distance, mathgen.word_shopping, mathgen.word_work,
          mathgen.word_age)
# for SFT only: the remaining mathgen families (compound answers are fine in a reasoning trace)
SFT_ONLY = tuple(f for f in mathgen.FAMILIES if f not in LEVEL3)


def _make(level: int, pool: tuple) -> Callable:
    def make(r) -> MathProblem:
        f = r.choice(pool)
        if level == 3:
            q, steps, ans = f(r)
            return MathProblem(f.__name__, f"math:{f.__name__}:{q}", q, tuple(steps), ans,
                               _bare(ans) if f in LEVEL3 else ans, 3)
        op, args, q, steps, ans = f(r)
        return MathProblem(f.__name__, f"math:{op}:{args}", q, tuple(steps), ans, _bare(ans), level)
    return make


def math_problem(split: str, seed: int, index: int, difficulty: int | None = None, sft: bool = False,
                 stream: str = "math") -> MathProblem:
    """Problem `index` of a stream. difficulty None mixes levels 1 / 2 / 3 as 3:4:3; `sft` also draws
    level-3 families whose answers are compound ("7 remainder 3", "x = 1, y = 2")."""
    r = rng(seed, split, stream, index)
    level = difficulty or r.choices((1, 2, 3), weights=(3, 4, 3))[0]
    pool = {1: LEVEL1, 2: LEVEL2, 3: LEVEL3 + (SFT_ONLY if sft else ())}[level]
    return draw(_make(level, pool), lambda p: p.key, split, r)


def reply(p: MathProblem, thinking: bool) -> dict:
    """The assistant message. Thinking: the steps are the reasoning and the content is the answer line;
    Instruct: the steps and the answer line are the content. The line states the bare value ("6/5",
    not "6/5 hours"; units stay in the steps), as RL rewards it."""
    steps = "\n".join(p.steps)
    if thinking:
        return {"role": "assistant", "reasoning_content": steps, "content": final_line(p.value)}
    return {"role": "assistant", "content": f"{steps}\n\n{final_line(p.value)}"}


def user_prompt(p: MathProblem, r, instruct_format: bool) -> str:
    extra = r.choice(["", " Show your steps.", " Think step by step."]) if not instruct_format else ""
    return p.statement + extra + (f"\n{ANSWER_INSTRUCTION}" if instruct_format else "")
