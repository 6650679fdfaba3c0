"""Templates of verifiable coding tasks: a spec -> a Python function, with assert tests.

Each template draws its constants (the character to count, the divisor, the window size ...) and
cosmetic choices (function and argument names, type hints, which of several correct bodies) from a
`random.Random` and returns a `CodeSpec`. The expected values in the tests come from a reference
written separately from the solution text (usually with other builtins), so running the solution
against its tests is a real check: `codetasks.check_specs` does it for every generated task.

`CodeSpec.consts` (with the template name) is the task's identity for the train / held-out split;
names and phrasing are not. Difficulty: 1 = one-line tasks a tiny model can learn (add a constant,
greet), 2 = string / list / dict / arithmetic tasks, 3 = recursion (codebank_more.py) and classes (codeprogs.py).
"""
from __future__ import annotations

import collections
import itertools
import math
import random
import string
from dataclasses import dataclass
from textwrap import dedent, indent
from typing import Any, Callable, Sequence

WORDS = ("apple", "banana", "kiwi", "level", "radar", "code", "model", "token", "queue", "stack", "tree",
         "graph", "expert", "router", "kernel", "python", "kotlin", "lemon", "melon", "data", "loop", "cache",
         "vector", "matrix", "tensor", "string", "noon", "civic", "refer", "bird", "cloud", "river", "stone")


@dataclass(frozen=True)
class CodeSpec:
    template: str
    consts: tuple            # with `template`, the task's identity for the split
    name: str                # entry point: function or class name
    signature: str           # "def count_char(s: str) -> int:" or "class Counter:"
    doc: str                 # what the code must do, in one or a few sentences
    solution: str            # complete, correct code
    tests: tuple[str, ...]   # assert-style snippets, run after the solution in one namespace
    example: tuple[str, str]  # (a call, the repr of its result) for prompts
    explain: str             # one line on how the solution works
    difficulty: int

    @property
    def key(self) -> str:
        return f"code:{self.template}:{self.consts!r}"


def sentence(r: random.Random, n: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n))


def ints(r: random.Random, n: int, lo: int = -9, hi: int = 20) -> list[int]:
    return [r.randint(lo, hi) for _ in range(n)]


def canon(v: Any) -> Any:
    """Dicts with sorted keys (recursively), so a test's text does not depend on how the reference
    happened to build the dict."""
    if isinstance(v, dict):
        return {k: canon(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [canon(x) for x in v]
    return v


def fn(r: random.Random, template: str, consts: tuple, names: Sequence[str], args: Sequence[Sequence[str]],
       types: Sequence[str], ret: str, doc: str, bodies: Sequence[tuple[str, str]], cases: Sequence[tuple],
       ref: Callable[..., Any], difficulty: int = 2) -> CodeSpec:
    """A function task. `args`: alternative tuples of parameter names (one name per parameter), used in
    `doc` and the bodies as $a0, $a1, ...; `bodies`: (body, explanation) pairs, all correct."""
    name = r.choice(list(names))
    params = r.choice(list(args))
    hints = r.random() < 0.5
    sub = {f"a{i}": p for i, p in enumerate(params)}
    sig = ", ".join(f"{p}: {t}" if hints else p for p, t in zip(params, types))
    signature = f"def {name}({sig})" + (f" -> {ret}" if hints and ret else "") + ":"
    body, explain = r.choice(list(bodies))
    code = signature + "\n" + indent(string.Template(dedent(body).strip("\n")).substitute(sub), "    ") + "\n"
    text = string.Template(doc).substitute({k: f"`{v}`" for k, v in sub.items()})
    tests = []
    for case in cases:
        call = f"{name}({', '.join(repr(a) for a in case)})"
        tests.append(f"assert {call} == {canon(ref(*case))!r}")
    example = tests[0][len("assert "):].split(" == ", 1)
    return CodeSpec(template, consts, name, signature, text, code, tuple(tests), (example[0], example[1]),
                    explain, difficulty)


S = (("s",), ("text",), ("word",), ("value",))
XS = (("xs",), ("nums",), ("values",), ("items",))
N = (("n",), ("num",), ("k",), ("x",))


# ---- difficulty 1: one-line tasks ------------------------------------------------------------

def add_const(r):
    k = r.randint(1, 30)
    return fn(r, "add_const", (k,), ["add", f"plus_{k}", "add_offset", "shift"], N, ["int"], "int",
              f"Return $a0 plus {k}.", [(f"return $a0 + {k}", f"Add {k} to the argument.")],
              [(v,) for v in ints(r, 4, -50, 50)], lambda x: k + x, 1)


def mul_const(r):
    k = r.randint(2, 12)
    return fn(r, "mul_const", (k,), ["times", f"times_{k}", "scale", "multiply"], N, ["int"], "int",
              f"Return $a0 multiplied by {k}.", [(f"return $a0 * {k}", f"Multiply the argument by {k}.")],
              [(v,) for v in ints(r, 4, -20, 20)], lambda x: sum([x] * k), 1)


def is_multiple(r):
    k = r.randint(2, 10)
    return fn(r, "is_multiple", (k,), [f"divisible_by_{k}", "is_multiple", f"is_multiple_of_{k}"], N, ["int"],
              "bool", f"Return True if $a0 is divisible by {k}, otherwise False.",
              [(f"return $a0 % {k} == 0", f"Test whether the remainder modulo {k} is zero.")],
              [(v,) for v in [k * r.randint(-5, 5), k * r.randint(1, 9) + 1, r.randint(-40, 40), 0]],
              lambda x: math.gcd(x, k) == k or x == 0, 1)


def greet(r):
    word, punct = r.choice(["Hello", "Hi", "Welcome", "Good morning", "Hey"]), r.choice("!.")
    return fn(r, "greet", (word, punct), ["greet", "greeting", "say_hello", "welcome"],
              (("name",), ("who",), ("person",)), ["str"], "str",
              f"Return the greeting '{word}, ' followed by $a0 and '{punct}', e.g. '{word}, Ada{punct}'.",
              [(f"return '{word}, ' + $a0 + '{punct}'", "Concatenate the greeting, the name and the mark."),
               (f"return f'{word}, {{$a0}}{punct}'", "Build the greeting with an f-string.")],
              [(n,) for n in ["Ada", "Linus", r.choice(["Grace", "Ken", "Barbara"]), ""]],
              lambda n: "%s, %s%s" % (word, n, punct), 1)


def repeat_str(r):
    k = r.randint(2, 5)
    return fn(r, "repeat_str", (k,), ["repeat", f"repeat_{k}", "duplicate"], S, ["str"], "str",
              f"Return $a0 repeated {k} times.", [(f"return $a0 * {k}", "Use string repetition.")],
              [(w,) for w in [r.choice(WORDS), "ab", ""]], lambda s: "".join([s] * k), 1)


def longer_than(r):
    k = r.randint(1, 10)
    return fn(r, "longer_than", (k,), ["is_long", f"longer_than_{k}", "too_long"], S, ["str"], "bool",
              f"Return True if $a0 has more than {k} characters, otherwise False.",
              [(f"return len($a0) > {k}", "Compare the length with the limit.")],
              [("x" * (k + 1),), ("y" * k,), (r.choice(WORDS),), ("",)], lambda s: len(s) >= k + 1, 1)


def last_or(r):
    d = r.choice([None, 0, -1])
    return fn(r, "last_or", (d,), ["last", "last_element", "tail_value"], XS, ["list"], "",
              f"Return the last element of $a0, or {d!r} if $a0 is empty.",
              [(f"return $a0[-1] if $a0 else {d!r}", "Index -1 when the list is not empty.")],
              [(ints(r, r.randint(1, 5)),), ([],), ([r.randint(0, 9)],)], lambda xs: (list(reversed(xs)) or [d])[0], 1)


# ---- strings ---------------------------------------------------------------------------------

def count_char(r):
    c = r.choice("abcdeilmnorst")
    return fn(r, "count_char", (c,), ["count_char", "count_occurrences", "char_count", f"count_{c}"], S, ["str"],
              "int", f"Return how many times the character {c!r} occurs in $a0.",
              [(f"return $a0.count({c!r})", "str.count does the counting."),
               (f"total = 0\nfor ch in $a0:\n    if ch == {c!r}:\n        total += 1\nreturn total",
                "Walk the string and count the matching characters.")],
              [(sentence(r, r.randint(1, 5)),) for _ in range(3)] + [("",), (c * 3 + "x",)],
              lambda s: len([x for x in s if x == c]))


def replace_char(r):
    a, b = r.choice("aeiou"), r.choice("*#_-")
    return fn(r, "replace_char", (a, b), ["replace_char", "mask", f"mask_{a}", "substitute"], S, ["str"], "str",
              f"Return $a0 with every {a!r} replaced by {b!r}.",
              [(f"return $a0.replace({a!r}, {b!r})", "str.replace swaps every occurrence."),
               (f"return ''.join({b!r} if ch == {a!r} else ch for ch in $a0)", "Rebuild the string character by character.")],
              [(sentence(r, r.randint(1, 4)),) for _ in range(3)] + [("",)],
              lambda s: b.join(s.split(a)))


def caesar(r):
    k = r.randint(1, 25)
    body = f"""
        out = []
        for ch in $a0:
            if 'a' <= ch <= 'z':
                out.append(chr((ord(ch) - ord('a') + {k}) % 26 + ord('a')))
            else:
                out.append(ch)
        return ''.join(out)"""
    low = string.ascii_lowercase
    table = str.maketrans(low, low[k:] + low[:k])
    return fn(r, "caesar", (k,), ["caesar", "shift_letters", "rotate_letters", f"rot{k}"], S, ["str"], "str",
              f"Shift every lowercase letter of $a0 forward by {k} places in the alphabet, wrapping from 'z' "
              f"back to 'a'; leave all other characters unchanged, and return the result.",
              [(body, f"Rotate each lowercase letter by {k} modulo 26 and keep the rest.")],
              [(sentence(r, 2),), ("Hello, world!",), ("xyz abc",), ("",)], lambda s: s.translate(table))


def truncate(r):
    n = r.randint(3, 12)
    return fn(r, "truncate", (n,), ["truncate", "shorten", "clip_text", "ellipsize"], S, ["str"], "str",
              f"If $a0 is longer than {n} characters, return its first {n} characters followed by '...'; "
              f"otherwise return $a0 unchanged.",
              [(f"if len($a0) > {n}:\n    return $a0[:{n}] + '...'\nreturn $a0", "Slice and append '...' only when too long.")],
              [(sentence(r, 3),), ("q" * n,), ("q" * (n + 1),), ("",)],
              lambda s: s if len(s) <= n else "".join(list(s)[:n]) + "...")


def repeat_chars(r):
    k = r.randint(2, 5)
    return fn(r, "repeat_chars", (k,), ["stretch", "repeat_chars", "stutter"], S, ["str"], "str",
              f"Return a string in which every character of $a0 is repeated {k} times, e.g. 'ab' becomes "
              f"'{'a' * k}{'b' * k}'.",
              [(f"return ''.join(ch * {k} for ch in $a0)", "Repeat each character and join.")],
              [(r.choice(WORDS),), ("a b",), ("",)], lambda s: "".join(itertools.chain.from_iterable(zip(*[s] * k))))


def vowels(r):
    keep, with_y = r.choice([False, True]), r.choice([False, True])
    vs = "aeiou" + ("y" if with_y else "")
    what = ", ".join(vs)
    doc = (f"Return only the vowels ({what}, in either case) of $a0, in their original order." if keep else
           f"Return $a0 with all vowels ({what}, in either case) removed.")
    op = "in" if keep else "not in"
    return fn(r, "vowels", (keep, with_y), ["vowels_only", "keep_vowels"] if keep else ["remove_vowels", "strip_vowels"],
              S, ["str"], "str", doc,
              [(f"return ''.join(ch for ch in $a0 if ch.lower() {op} {vs!r})", "Filter the characters by membership.")],
              [(sentence(r, 3),), ("Yearly AUDIT",), ("",)],
              lambda s: "".join(c for c in s if (c.lower() in set(vs)) == keep))


def words_longer(r):
    n = r.randint(2, 8)
    return fn(r, "words_longer", (n,), ["count_long_words", "long_words", f"words_over_{n}"], S, ["str"], "int",
              f"Return how many words of $a0 (separated by whitespace) are longer than {n} characters.",
              [(f"return sum(1 for w in $a0.split() if len(w) > {n})", "Split on whitespace and count the long words.")],
              [(sentence(r, r.randint(2, 7)),) for _ in range(3)] + [("",)],
              lambda s: len(list(filter(lambda w: len(w) > n, s.split()))))


def strip_prefix(r):
    p = r.choice(["test_", "get_", "un", "re", "pre", "__", "my_", "tmp_"])
    return fn(r, "strip_prefix", (p,), ["strip_prefix", "drop_prefix", "without_prefix"], S, ["str"], "str",
              f"If $a0 starts with {p!r}, return $a0 without that prefix; otherwise return $a0 unchanged.",
              [(f"if $a0.startswith({p!r}):\n    return $a0[{len(p)}:]\nreturn $a0", "Check the prefix and slice it off.")],
              [(p + r.choice(WORDS),), (r.choice(WORDS),), (p,), (r.choice(WORDS) + p,)], lambda s: s.removeprefix(p))


def pad_left(r):
    w, ch = r.randint(4, 10), r.choice("0*.-")
    return fn(r, "pad_left", (w, ch), ["pad_left", "left_pad", "align_right"], S, ["str"], "str",
              f"Return $a0 padded on the left with {ch!r} to a length of {w} characters; a string of {w} or "
              f"more characters is returned unchanged.",
              [(f"return $a0.rjust({w}, {ch!r})", "str.rjust pads on the left."),
               (f"return {ch!r} * max(0, {w} - len($a0)) + $a0", "Prepend as many pad characters as are missing.")],
              [("7",), (r.choice(WORDS),), ("z" * (w + 2),), ("",)], lambda s: s if len(s) >= w else ch * (w - len(s)) + s)


def rle(r):
    count_first = r.choice([False, True])
    piece = "f'{end - idx}{$a0[idx]}'" if count_first else "f'{$a0[idx]}{end - idx}'"
    body = f"""
        out = []
        idx = 0
        while idx < len($a0):
            end = idx
            while end < len($a0) and $a0[end] == $a0[idx]:
                end += 1
            out.append({piece})
            idx = end
        return ''.join(out)"""
    ex = "3a1b" if count_first else "a3b1"
    order = "the run length followed by the character" if count_first else "the character followed by the run length"
    runs = ["".join(r.choice("aab") for _ in range(r.randint(3, 9))) for _ in range(2)]
    return fn(r, "rle", (count_first,), ["rle", "run_length_encode", "compress"], S, ["str"], "str",
              f"Run-length encode $a0: each run of equal consecutive characters becomes {order}, e.g. 'aaab' "
              f"becomes '{ex}'. The empty string encodes to ''.",
              [(body, "Scan runs of equal characters and emit each run's character and length.")],
              [(x,) for x in runs] + [("zz",), ("",)],
              lambda s: "".join((f"{len(list(g))}{c}" if count_first else f"{c}{len(list(g))}")
                                for c, g in itertools.groupby(s)))


def case_every(r):
    k = r.randint(2, 4)
    return fn(r, "case_every", (k,), ["alternate_case", "case_pattern", "spongebob"], S, ["str"], "str",
              f"Return $a0 with the characters at positions 0, {k}, {2 * k}, ... in upper case and all other "
              f"characters in lower case.",
              [(f"return ''.join(ch.upper() if i % {k} == 0 else ch.lower() for i, ch in enumerate($a0))",
                f"Upper-case the positions divisible by {k}.")],
              [(sentence(r, 2),), ("ABCDEFG",), ("",)],
              lambda s: "".join(c.upper() if not i % k else c.lower() for i, c in zip(range(len(s)), s)))


def palindrome(r):
    fold, alnum = r.choice([False, True]), r.choice([False, True])
    cond = "".join([", ignoring case" if fold else "", " and considering only letters and digits" if alnum else ""])
    lines = [f"chars = [ch for ch in $a0 if ch.isalnum()]" if alnum else "chars = list($a0)"]
    if fold:
        lines.append("chars = [ch.lower() for ch in chars]")
    lines.append("return chars == chars[::-1]")

    def ref(s):
        t = [c for c in s if c.isalnum()] if alnum else list(s)
        t = [c.lower() for c in t] if fold else t
        return all(t[i] == t[-1 - i] for i in range(len(t) // 2))
    return fn(r, "palindrome", (fold, alnum), ["is_palindrome", "palindrome", "reads_same"], S, ["str"], "bool",
              f"Return True if $a0 reads the same forwards and backwards{cond}, otherwise False.",
              [("\n".join(lines), "Normalise the characters, then compare with the reverse.")],
              [("Level",), ("No lemon, no melon",), ("racecar",), ("abca",), ("",)], ref)


def initials(r):
    sep = r.choice(["", ".", "-", " "])
    return fn(r, "initials", (sep,), ["initials", "acronym", "first_letters"], S, ["str"], "str",
              f"Return the first letter of every word of $a0, upper-cased and joined with {sep!r}.",
              [(f"return {sep!r}.join(w[0].upper() for w in $a0.split())", "Take each word's first letter.")],
              [(sentence(r, r.randint(1, 4)),) for _ in range(2)] + [("",)],
              lambda s: sep.join(w[:1].upper() for w in s.split()))


def snake_to_camel(r):
    pascal = r.choice([False, True])
    body = ("return ''.join(p.capitalize() for p in $a0.split('_'))" if pascal else
            "parts = $a0.split('_')\nreturn parts[0] + ''.join(p.capitalize() for p in parts[1:])")
    style = "PascalCase (every word capitalised)" if pascal else "camelCase (the first word stays lower case)"
    cases = [("_".join(r.sample(WORDS, r.randint(1, 3))),) for _ in range(3)]
    return fn(r, "snake_to_camel", (pascal,), ["to_pascal" if pascal else "to_camel", "snake_to_camel", "convert_case"],
              (("name",), ("ident",), ("s",)), ["str"], "str",
              f"Convert the lower-case snake_case identifier $a0 to {style} and return it.",
              [(body, "Split on underscores and capitalise the words.")], cases,
              lambda s: "".join(w.title() if (i or pascal) else w for i, w in enumerate(s.split("_"))))


# ---- lists -----------------------------------------------------------------------------------

def sum_divisible(r):
    k = r.randint(2, 9)
    return fn(r, "sum_divisible", (k,), ["sum_divisible", f"sum_multiples_of_{k}", "divisible_total"], XS,
              ["list[int]"], "int", f"Return the sum of the elements of $a0 that are divisible by {k}.",
              [(f"return sum(x for x in $a0 if x % {k} == 0)", f"Sum the elements with remainder 0 modulo {k}.")],
              [(ints(r, r.randint(3, 8), -30, 60),) for _ in range(3)] + [([],)],
              lambda xs: sum(filter(lambda v: v % k == 0, xs)))


def filter_greater(r):
    t = r.randint(-5, 20)
    return fn(r, "filter_greater", (t,), ["above", f"greater_than_{abs(t)}", "filter_greater", "keep_large"], XS,
              ["list[int]"], "list[int]", f"Return a new list with the elements of $a0 that are greater than {t}, "
              f"in their original order.",
              [(f"return [x for x in $a0 if x > {t}]", "A list comprehension keeps the large elements.")],
              [(ints(r, r.randint(3, 8), -10, 30),) for _ in range(3)] + [([],)],
              lambda xs: list(filter(lambda v: v > t, xs)))


def affine(r):
    a, b = r.randint(2, 5), r.randint(-3, 5)
    expr = f"{a} * x" + (f" + {b}" if b > 0 else f" - {-b}" if b < 0 else "")
    return fn(r, "affine", (a, b), ["transform", "affine_map", "scale_shift"], XS, ["list[int]"], "list[int]",
              f"Return a new list in which each element x of $a0 is replaced by {expr}.",
              [(f"return [{expr} for x in $a0]", "Map every element with a comprehension.")],
              [(ints(r, r.randint(2, 6)),) for _ in range(2)] + [([],)], lambda xs: [a * v + b for v in xs])


def second_largest(r):
    d = r.choice([None, -1, 0])
    body = f"values = sorted(set($a0))\nif len(values) < 2:\n    return {d!r}\nreturn values[-2]"

    def ref(xs):
        u = sorted(set(xs), reverse=True)
        return u[1] if len(u) > 1 else d
    return fn(r, "second_largest", (d,), ["second_largest", "runner_up", "second_max"], XS, ["list[int]"], "",
              f"Return the second largest distinct value in $a0, or {d!r} if $a0 has fewer than two distinct values.",
              [(body, "Sort the distinct values and take the one before the last.")],
              [(ints(r, r.randint(3, 7), 1, 30),) for _ in range(2)] + [([5, 5],), ([],), ([3, 9, 9],)], ref)


def chunk(r):
    k = r.randint(2, 5)
    return fn(r, "chunk", (k,), ["chunk", "chunks", "batched", f"split_every_{k}"], XS, ["list"], "list",
              f"Split $a0 into consecutive chunks of {k} elements (the last chunk may be shorter) and return the "
              f"list of chunks.",
              [(f"return [$a0[i:i + {k}] for i in range(0, len($a0), {k})]", f"Slice every {k} elements.")],
              [(ints(r, r.randint(1, 11)),) for _ in range(2)] + [([],)],
              lambda xs: [list(c) for c in zip(*[iter(xs)] * k)] + ([xs[len(xs) - len(xs) % k:]] if len(xs) % k else []))


def rotate_left(r):
    k = r.randint(1, 6)
    body = f"if not $a0:\n    return []\nshift = {k} % len($a0)\nreturn $a0[shift:] + $a0[:shift]"

    def ref(xs):
        d = collections.deque(xs)
        d.rotate(-k)
        return list(d)
    return fn(r, "rotate_left", (k,), ["rotate_left", "rotate", f"rotate_by_{k}"], XS, ["list"], "list",
              f"Return $a0 rotated left by {k} positions (the first element moves to the end, {k} times). An "
              f"empty list stays empty.",
              [(body, "Reduce the shift modulo the length and swap the two slices.")],
              [(ints(r, r.randint(1, 8)),) for _ in range(3)] + [([],)], ref)


def prefix_sums(r):
    start = r.randint(0, 5)
    body = f"total = {start}\nout = []\nfor x in $a0:\n    total += x\n    out.append(total)\nreturn out"
    return fn(r, "prefix_sums", (start,), ["running_total", "prefix_sums", "cumulative"], XS, ["list[int]"],
              "list[int]", f"Return the running totals of $a0 starting from {start}: element i of the result is "
              f"{start} plus the sum of the first i + 1 elements.",
              [(body, "Keep a running total and record it after each element.")],
              [(ints(r, r.randint(1, 6)),) for _ in range(2)] + [([],)],
              lambda xs: list(itertools.accumulate(xs, initial=start))[1:])


def dedupe(r):
    keep = r.choice(["first", "last"])
    if keep == "first":
        bodies = [("seen = set()\nout = []\nfor x in $a0:\n    if x not in seen:\n        seen.add(x)\n"
                   "        out.append(x)\nreturn out", "Track seen values and keep the first of each."),
                  ("return list(dict.fromkeys($a0))", "dict.fromkeys keeps the first occurrence, in order.")]
        ref = lambda xs: [v for i, v in enumerate(xs) if v not in xs[:i]]  # noqa: E731
    else:
        bodies = [("out = []\nfor idx, x in enumerate($a0):\n    if x not in $a0[idx + 1:]:\n        out.append(x)\n"
                   "return out", "Keep an element only if it does not occur again later.")]
        ref = lambda xs: list(reversed(list(dict.fromkeys(reversed(xs)))))  # noqa: E731
    return fn(r, "dedupe", (keep,), ["dedupe", "unique", "remove_duplicates"], XS, ["list"], "list",
              f"Return $a0 without duplicates, keeping the {keep} occurrence of each value; the kept elements "
              f"stay in their original relative order.", bodies,
              [(ints(r, r.randint(3, 9), 0, 5),) for _ in range(3)] + [([],)], ref)


def first_above(r):
    t = r.randint(0, 15)
    body = f"for i, x in enumerate($a0):\n    if x > {t}:\n        return i\nreturn -1"
    return fn(r, "first_above", (t,), ["first_above", "index_above", f"find_over_{t}"], XS, ["list[int]"], "int",
              f"Return the index of the first element of $a0 greater than {t}, or -1 if there is none.",
              [(body, "Scan with enumerate and return at the first match.")],
              [(ints(r, r.randint(2, 7), -5, 25),) for _ in range(3)] + [([],), ([t],)],
              lambda xs: next((i for i in range(len(xs)) if xs[i] > t), -1))


def max_window(r):
    k = r.randint(2, 4)
    body = f"if len($a0) < {k}:\n    return None\nreturn max(sum($a0[i:i + {k}]) for i in range(len($a0) - {k} + 1))"

    def ref(xs):
        if len(xs) < k:
            return None
        best = cur = sum(xs[:k])
        for i in range(k, len(xs)):
            cur += xs[i] - xs[i - k]
            best = max(best, cur)
        return best
    return fn(r, "max_window", (k,), ["max_window_sum", "best_window", f"max_sum_of_{k}"], XS, ["list[int]"], "",
              f"Return the largest sum of {k} consecutive elements of $a0, or None if $a0 has fewer than {k} elements.",
              [(body, f"Try every window of {k} and keep the largest sum.")],
              [(ints(r, r.randint(k, 9)),) for _ in range(3)] + [([1] * (k - 1),)], ref)


def count_in_range(r):
    lo = r.randint(0, 5)
    hi = lo + r.randint(3, 10)
    return fn(r, "count_in_range", (lo, hi), ["count_between", "count_in_range", "in_band"], XS, ["list[int]"], "int",
              f"Return how many elements of $a0 lie between {lo} and {hi}, both included.",
              [(f"return sum(1 for x in $a0 if {lo} <= x <= {hi})", "Count with a chained comparison.")],
              [(ints(r, r.randint(3, 9), -5, 20),) for _ in range(3)] + [([],)],
              lambda xs: len([v for v in xs if v in range(lo, hi + 1)]))


def interleave(r):
    second_first = r.choice([False, True])
    p, q = ("$a1", "$a0") if second_first else ("$a0", "$a1")
    body = (f"out = []\nfor i in range(max(len($a0), len($a1))):\n    if i < len({p}):\n        out.append({p}[i])\n"
            f"    if i < len({q}):\n        out.append({q}[i])\nreturn out")

    def ref(a, b):
        a, b = (b, a) if second_first else (a, b)
        return [v for pair in itertools.zip_longest(a, b, fillvalue=object) for v in pair if v is not object]
    return fn(r, "interleave", (second_first,), ["interleave", "zip_merge", "alternate"],
              (("a", "b"), ("xs", "ys"), ("left", "right"), ("first", "second")), ["list", "list"], "list",
              f"Return a list that alternates the elements of $a0 and $a1, starting with {'$a1' if second_first else '$a0'}; "
              f"when one list runs out, append the rest of the other.", [(body, "Walk both lists by index.")],
              [(ints(r, r.randint(0, 4)), ints(r, r.randint(0, 4))) for _ in range(3)], ref)


def pairwise_diff(r):
    absolute = r.choice([False, True])
    expr = "abs($a0[i + 1] - $a0[i])" if absolute else "$a0[i + 1] - $a0[i]"
    what = "the absolute difference between each element and the one before it" if absolute else \
        "each element minus the one before it"
    return fn(r, "pairwise_diff", (absolute,), ["differences", "pairwise_diff", "deltas"], XS, ["list[int]"],
              "list[int]", f"Return the list of {what}, for consecutive elements of $a0 (one element shorter than $a0; "
              f"empty for fewer than two elements).",
              [(f"return [{expr} for i in range(len($a0) - 1)]", "Subtract neighbours by index.")],
              [(ints(r, r.randint(2, 7)),) for _ in range(2)] + [([4],), ([],)],
              lambda xs: [abs(b - a) if absolute else b - a for a, b in zip(xs, xs[1:])])


def clamp(r):
    lo, hi = r.randint(-5, 0), r.randint(5, 15)
    return fn(r, "clamp", (lo, hi), ["clamp", "clip", "clamp_all"], XS, ["list[int]"], "list[int]",
              f"Return a new list in which every element of $a0 below {lo} is replaced by {lo} and every element "
              f"above {hi} by {hi}.",
              [(f"return [min(max(x, {lo}), {hi}) for x in $a0]", "Clamp each element with min and max.")],
              [(ints(r, r.randint(2, 7), -15, 25),) for _ in range(2)] + [([],)],
              lambda xs: [lo if v < lo else hi if v > hi else v for v in xs])


FUNCTIONS_EASY = (add_const, mul_const, is_multiple, greet, repeat_str, longer_than, last_or)
FUNCTIONS_STRING = (count_char, replace_char, caesar, truncate, repeat_chars, vowels, words_longer, strip_prefix,
                    pad_left, rle, case_every, palindrome, initials, snake_to_camel)
FUNCTIONS_LIST = (sum_divisible, filter_greater, affine, second_largest, chunk, rotate_left, prefix_sums, dedupe,
                  first_above, max_window, count_in_range, interleave, pairwise_diff, clamp)
