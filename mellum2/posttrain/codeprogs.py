"""Coding-task templates beyond single functions: classes (tested by scripts) and whole programs that
read standard input and print to standard output (tested by stdin -> expected stdout pairs).

Expected values come from simulating the spec in the generator, never from running the solution.
Stdout comparison, as the verifiers should do it: trailing whitespace of each line and trailing blank
lines are ignored (`normalise_stdout`).
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from textwrap import dedent

from .codebank import WORDS, CodeSpec, ints, sentence


@dataclasses.dataclass(frozen=True)
class StdioSpec:
    template: str
    consts: tuple
    doc: str
    solution: str                      # a complete program
    cases: tuple[tuple[str, str], ...]  # (stdin, expected stdout)
    explain: str
    difficulty: int = 2

    @property
    def key(self) -> str:
        return f"stdio:{self.template}:{self.consts!r}"


def normalise_stdout(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _cls(template, consts, name, doc, code, tests, explain) -> CodeSpec:
    return CodeSpec(template, consts, name, f"class {name}:", doc, dedent(code).strip("\n") + "\n",
                    tuple(dedent(t).strip("\n") for t in tests), ("", ""), explain, 3)


def _ops_script(var: str, ops: list[str], check: str) -> str:
    return "\n".join([f"{var} = {{name}}()"] + [f"{var}.{op}()" for op in ops] + [check])


# ---- classes ---------------------------------------------------------------------------------

def counter(r):
    step, start = r.randint(1, 5), r.randint(0, 3)
    name = r.choice(["Counter", "Tally", "Clicker", "StepCounter"])
    code = f"""
        class {name}:
            def __init__(self):
                self.value = {start}

            def increment(self):
                self.value += {step}

            def decrement(self):
                self.value -= {step}

            def reset(self):
                self.value = {start}
        """
    tests = []
    for _ in range(3):
        ops = [r.choice(["increment", "increment", "decrement", "reset"]) for _ in range(r.randint(1, 6))]
        v = start
        for op in ops:
            v = {"increment": v + step, "decrement": v - step, "reset": start}[op]
        tests.append(_ops_script("c", ops, f"assert c.value == {v}").replace("{name}", name))
    return _cls("counter", (step, start), name,
                f"Write a class `{name}` whose instances start with the attribute `value` equal to {start}. "
                f"`increment()` adds {step} to `value`, `decrement()` subtracts {step}, and `reset()` sets it back "
                f"to {start}.", code, [f"assert {name}().value == {start}"] + tests,
                "Keep the value in an attribute and update it in each method.")


def bounded_stack(r):
    cap, exc = r.randint(2, 6), r.choice(["OverflowError", "ValueError", "IndexError"])
    name = r.choice(["BoundedStack", "LimitedStack", "SmallStack"])
    code = f"""
        class {name}:
            def __init__(self):
                self._items = []

            def push(self, item):
                if len(self._items) >= {cap}:
                    raise {exc}('stack is full')
                self._items.append(item)

            def pop(self):
                return self._items.pop() if self._items else None

            def peek(self):
                return self._items[-1] if self._items else None

            def __len__(self):
                return len(self._items)
        """
    full = f"""
        s = {name}()
        for v in range({cap}):
            s.push(v)
        try:
            s.push(99)
        except {exc}:
            pass
        else:
            raise AssertionError('push on a full stack did not raise {exc}')
        assert len(s) == {cap} and s.peek() == {cap - 1}
        assert s.pop() == {cap - 1} and len(s) == {cap - 1}"""
    empty = f"s = {name}()\nassert s.pop() is None and s.peek() is None and len(s) == 0\ns.push('a')\nassert s.peek() == 'a'"
    return _cls("bounded_stack", (cap, exc), name,
                f"Write a class `{name}`: a stack holding at most {cap} items. `push(item)` adds an item, raising "
                f"`{exc}` when the stack is full; `pop()` removes and returns the top item (None when empty); "
                f"`peek()` returns the top item without removing it (None when empty); `len()` gives the number of "
                f"items.", code, [full, empty], "Back the stack with a list and check the size before pushing.")


def account(r):
    fee = r.randint(0, 3)
    name = r.choice(["Account", "BankAccount", "Wallet"])
    code = f"""
        class {name}:
            def __init__(self, balance=0):
                self.balance = balance

            def deposit(self, amount):
                self.balance += amount

            def withdraw(self, amount):
                if amount + {fee} > self.balance:
                    raise ValueError('insufficient funds')
                self.balance -= amount + {fee}
        """
    start, dep = r.randint(0, 50), r.randint(fee + 1, 40)
    w = r.randint(1, start + dep - fee)
    ok = f"a = {name}({start})\na.deposit({dep})\na.withdraw({w})\nassert a.balance == {start + dep - w - fee}"
    over = (f"a = {name}()\na.deposit({w})\ntry:\n    a.withdraw({w + 1})\nexcept ValueError:\n    pass\nelse:\n"
            f"    raise AssertionError('overdraft allowed')\nassert a.balance == {w}")
    return _cls("account", (fee,), name,
                f"Write a class `{name}` with a `balance` attribute (the constructor takes an optional starting "
                f"balance, default 0). `deposit(amount)` adds to it; `withdraw(amount)` takes the amount plus a fee "
                f"of {fee}, or raises ValueError (and changes nothing) when the balance does not cover both.",
                code, [ok, over, f"assert {name}().balance == 0"], "Check the balance before withdrawing.")


def rectangle(r):
    k = r.randint(2, 4)
    name = r.choice(["Rectangle", "Rect", "Box"])
    code = f"""
        class {name}:
            def __init__(self, width, height):
                self.width = width
                self.height = height

            def area(self):
                return self.width * self.height

            def perimeter(self):
                return 2 * (self.width + self.height)

            def scaled(self):
                return {name}(self.width * {k}, self.height * {k})
        """
    w, h = r.randint(1, 20), r.randint(1, 20)
    tests = [f"x = {name}({w}, {h})\nassert x.area() == {w * h} and x.perimeter() == {2 * w + 2 * h}",
             f"y = {name}({w}, {h}).scaled()\nassert (y.width, y.height) == ({w * k}, {h * k}) and y.area() == {w * h * k * k}"]
    return _cls("rectangle", (k,), name,
                f"Write a class `{name}` built from `width` and `height` (stored under those names), with methods "
                f"`area()`, `perimeter()` and `scaled()`, which returns a new `{name}` whose sides are {k} times as long.",
                code, tests, "Store the sides and compute the rest from them.")


def recent(r):
    cap, move = r.randint(2, 5), r.choice([False, True])
    name = r.choice(["RecentItems", "History", "RecentList"])
    again = "\n                if item in self._items:\n                    self._items.remove(item)" if move else ""
    code = f"""
        class {name}:
            def __init__(self):
                self._items = []

            def add(self, item):{again}
                self._items.append(item)
                if len(self._items) > {cap}:
                    self._items.pop(0)

            def items(self):
                return list(self._items)
        """
    tests = []
    for _ in range(2):
        adds = [r.randint(1, 4) for _ in range(r.randint(1, 8))]
        sim: list[int] = []
        for a in adds:
            if move and a in sim:
                sim.remove(a)
            sim = (sim + [a])[-cap:]
        tests.append("\n".join([f"h = {name}()"] + [f"h.add({a})" for a in adds] + [f"assert h.items() == {sim!r}"]))
    rule = " Adding an item that is already present moves it to the newest position." if move else \
        " An item added twice is kept twice."
    return _cls("recent", (cap, move), name,
                f"Write a class `{name}` that remembers the last {cap} items added with `add(item)`; `items()` returns "
                f"them as a list, oldest first, and the oldest item is dropped when there are more than {cap}.{rule}",
                code, tests + [f"assert {name}().items() == []"], "Append and trim a list from the front.")


def vector(r):
    manhattan = r.choice([False, True])
    name = r.choice(["Vector", "Vec2", "Point"])
    norm = "abs(self.x) + abs(self.y)" if manhattan else "self.x * self.x + self.y * self.y"
    code = f"""
        class {name}:
            def __init__(self, x, y):
                self.x = x
                self.y = y

            def __add__(self, other):
                return {name}(self.x + other.x, self.y + other.y)

            def __eq__(self, other):
                return isinstance(other, {name}) and (self.x, self.y) == (other.x, other.y)

            def norm(self):
                return {norm}
        """
    a, b, c, d = ints(r, 4, -9, 9)
    n = abs(a + c) + abs(b + d) if manhattan else (a + c) ** 2 + (b + d) ** 2
    tests = [f"v = {name}({a}, {b}) + {name}({c}, {d})\nassert v == {name}({a + c}, {b + d})\nassert v.norm() == {n}",
             f"assert {name}(1, 2) != {name}(2, 1)"]
    what = "the Manhattan length |x| + |y|" if manhattan else "the squared length x * x + y * y"
    return _cls("vector", (manhattan,), name,
                f"Write a class `{name}` for 2-D vectors with attributes `x` and `y`: `+` adds two vectors, `==` "
                f"compares them by coordinates, and `norm()` returns {what}.", code, tests,
                "Implement __add__ and __eq__ on the coordinates.")


def two_stack_queue(r):
    raise_empty = r.choice([False, True])
    name = r.choice(["Queue", "FifoQueue", "TwoStackQueue"])
    empty = "raise IndexError('empty queue')" if raise_empty else "return None"
    code = f"""
        class {name}:
            def __init__(self):
                self._in = []
                self._out = []

            def enqueue(self, item):
                self._in.append(item)

            def dequeue(self):
                if not self._out:
                    while self._in:
                        self._out.append(self._in.pop())
                if not self._out:
                    {empty}
                return self._out.pop()

            def __len__(self):
                return len(self._in) + len(self._out)
        """
    xs = ints(r, r.randint(2, 5), 0, 9)
    tests = ["\n".join([f"q = {name}()"] + [f"q.enqueue({x})" for x in xs] +
                       [f"assert len(q) == {len(xs)}", f"assert q.dequeue() == {xs[0]}", "q.enqueue(42)",
                        f"assert [q.dequeue() for _ in range({len(xs)})] == {xs[1:] + [42]!r}"])]
    tests.append(f"q = {name}()\ntry:\n    q.dequeue()\nexcept IndexError:\n    pass\nelse:\n    raise AssertionError('no IndexError')"
                 if raise_empty else f"assert {name}().dequeue() is None")
    return _cls("queue", (raise_empty,), name,
                f"Write a class `{name}`, a first-in first-out queue built from two lists used as stacks: "
                f"`enqueue(item)`, `dequeue()` (returns the oldest item; on an empty queue it "
                f"{'raises IndexError' if raise_empty else 'returns None'}) and `len()`.", code, tests,
                "Pour the input stack into the output stack when the output is empty.")


CLASSES = (counter, bounded_stack, account, rectangle, recent, vector, two_stack_queue)


# ---- stdin / stdout programs ------------------------------------------------------------------

def _prog(template, consts, doc, code, cases, explain, difficulty=2) -> StdioSpec:
    return StdioSpec(template, consts, doc, dedent(code).strip("\n") + "\n",
                     tuple((i, o if o.endswith("\n") else o + "\n") for i, o in cases), explain, difficulty)


def aggregate(r):
    op = r.choice(["sum", "maximum", "minimum", "product"])
    f = {"sum": sum, "maximum": max, "minimum": min, "product": lambda v: functools.reduce(operator.mul, v, 1)}[op]
    line = {"sum": "print(sum(nums))", "maximum": "print(max(nums))", "minimum": "print(min(nums))",
            "product": "result = 1\nfor v in nums:\n    result *= v\nprint(result)"}[op]
    cases = [(" ".join(map(str, xs)) + "\n", str(f(xs))) for xs in (ints(r, r.randint(1, 6)) for _ in range(3))]
    return _prog("aggregate", (op,), f"Read one line of integers separated by spaces from standard input and print "
                 f"their {op}.", "nums = [int(t) for t in input().split()]\n" + line, cases,
                 f"Parse the integers and print their {op}.", 1 if op != "product" else 2)


def line_op(r):
    op = r.choice(["reversed", "upper-cased", "with its words in reverse order", "with upper and lower case swapped"])
    code = {"reversed": "print(input()[::-1])", "upper-cased": "print(input().upper())",
            "with its words in reverse order": "print(' '.join(reversed(input().split())))",
            "with upper and lower case swapped": "print(input().swapcase())"}[op]
    f = {"reversed": lambda s: "".join(reversed(s)), "upper-cased": str.upper,
         "with its words in reverse order": lambda s: " ".join(s.split()[::-1]),
         "with upper and lower case swapped": lambda s: "".join(c.lower() if c.isupper() else c.upper() for c in s)}[op]
    lines = [sentence(r, r.randint(1, 4)).title() for _ in range(3)]
    return _prog("line_op", (op,), f"Read one line from standard input and print it {op}.", code,
                 [(s + "\n", f(s)) for s in lines], "One line of string manipulation.", 1)


def longest_word(r):
    last = r.choice([False, True])
    cmp = ">=" if last else ">"
    code = f"""
        n = int(input())
        words = [input().strip() for _ in range(n)]
        best = words[0]
        for w in words[1:]:
            if len(w) {cmp} len(best):
                best = w
        print(best)"""
    cases = []
    for _ in range(3):
        ws = [r.choice(WORDS) for _ in range(r.randint(1, 6))]
        top = max(map(len, ws))
        pick = [w for w in ws if len(w) == top][-1 if last else 0]
        cases.append((f"{len(ws)}\n" + "\n".join(ws) + "\n", pick))
    return _prog("longest_word", (last,), f"The first line of standard input holds n >= 1; each of the next n lines "
                 f"holds one word. Print the longest word (the {'last' if last else 'first'} one on a tie).", code,
                 cases, "Keep the best word while reading.")


def fizz_lines(r):
    a, b = r.choice([(2, 3), (3, 5), (2, 7), (4, 6)])
    code = f"""
        n = int(input())
        for i in range(1, n + 1):
            out = ('Fizz' if i % {a} == 0 else '') + ('Buzz' if i % {b} == 0 else '')
            print(out or i)"""
    cases = []
    for n in (r.randint(5, 16), 1):
        rows = [(("Fizz" if i % a == 0 else "") + ("Buzz" if i % b == 0 else "")) or str(i) for i in range(1, n + 1)]
        cases.append((f"{n}\n", "\n".join(rows)))
    return _prog("fizz_lines", (a, b), f"Read an integer n and print the numbers 1 to n, one per line, but print "
                 f"'Fizz' instead of multiples of {a}, 'Buzz' instead of multiples of {b}, and 'FizzBuzz' for "
                 f"multiples of both.", code, cases, "Build each line from the two divisibility tests.")


def binop(r):
    op = r.choice(["+", "-", "*", "//", "%"])
    f = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}[op]
    words = {"+": "their sum", "-": "a minus b", "*": "their product",
             "//": "a divided by b rounded down (Python's //)", "%": "a modulo b (Python's %)"}[op]
    pairs = [(r.randint(-50, 99), r.choice([v for v in range(-9, 13) if v])) for _ in range(3)]
    return _prog("binop", (op,), f"Read two integers a and b (b is not zero) separated by a space and print {words}.",
                 f"a, b = map(int, input().split())\nprint(a {op} b)", [(f"{a} {b}\n", str(f(a, b))) for a, b in pairs],
                 "Parse both numbers and apply the operator.", 1)


def count_long(r):
    k = r.randint(2, 6)
    lines = [sentence(r, r.randint(1, 7)) for _ in range(3)]
    return _prog("count_long", (k,), f"Read a line of words separated by spaces and print how many of them have at "
                 f"least {k} letters.", f"print(sum(1 for w in input().split() if len(w) >= {k}))",
                 [(s + "\n", str(len([w for w in s.split() if len(w) >= k]))) for s in lines],
                 "Split the line and count the long words.")


def sort_nums(r):
    desc = r.choice([False, True])
    code = f"nums = sorted(map(int, input().split()){', reverse=True' if desc else ''})\nprint(' '.join(map(str, nums)))"
    rows = [ints(r, r.randint(1, 7), -20, 50) for _ in range(3)]
    return _prog("sort_nums", (desc,), f"Read integers separated by spaces and print them in "
                 f"{'descending' if desc else 'ascending'} order, separated by single spaces.", code,
                 [(" ".join(map(str, xs)) + "\n", " ".join(map(str, sorted(xs)[::-1] if desc else sorted(xs))))
                  for xs in rows], "Sort and join.")


def triangle(r):
    ch = r.choice("*#+o")
    return _prog("triangle", (ch,), f"Read an integer n and print a triangle of n lines: line i (from 1) holds i "
                 f"copies of '{ch}'.", f"n = int(input())\nfor i in range(1, n + 1):\n    print('{ch}' * i)",
                 [(f"{n}\n", "\n".join(ch * i for i in range(1, n + 1))) for n in (r.randint(2, 6), 1)],
                 "One print per line with string repetition.", 1)


def char_counts(r):
    code = """
        line = input()
        counts = {}
        for ch in line:
            if ch != ' ':
                counts[ch] = counts.get(ch, 0) + 1
        for ch, c in counts.items():
            print(ch, c)"""
    cases = []
    for s in (sentence(r, 2), r.choice(WORDS)):
        seen = [c for i, c in enumerate(s) if c != " " and c not in s[:i]]
        cases.append((s + "\n", "\n".join(f"{c} {s.count(c)}" for c in seen)))
    return _prog("char_counts", (), "Read a line and print, for each distinct character other than space in order of "
                 "first appearance, the character, a space and how often it occurs, one character per line.", code,
                 cases, "Count in a dict, which keeps first-appearance order.")


def sum_above(r):
    k = r.randint(0, 10)
    code = f"import sys\n\nprint(sum(v for v in map(int, sys.stdin.read().split()) if v > {k}))"
    rows = [ints(r, r.randint(1, 6), -5, 20) for _ in range(3)]
    return _prog("sum_above", (k,), f"Standard input holds integers, one per line, until the end of input. Print the "
                 f"sum of those greater than {k}.", code,
                 [("\n".join(map(str, xs)) + "\n", str(sum(v for v in xs if v > k))) for xs in rows],
                 "Read everything, filter and sum.")


PROGRAMS = (aggregate, line_op, longest_word, fizz_lines, binop, count_long, sort_nums, triangle, char_counts, sum_above)

