"""More coding-task templates (see codebank.py for the shape): dicts, integer maths, recursion, classes.

Class tasks are tested by short scripts (construct, call methods, assert on the state); the expected
values come from simulating the spec in the generator, not from running the solution.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from textwrap import dedent

from .codebank import S, XS, fn, ints, sentence

D = (("d",), ("mapping",), ("table",), ("counts",))
N = (("n",), ("num",), ("number",))


# ---- dicts -----------------------------------------------------------------------------------

def word_freq(r):
    m = r.randint(1, 4)
    body = (f"counts = {{}}\nfor w in $a0.split():\n    w = w.lower()\n    if len(w) >= {m}:\n"
            f"        counts[w] = counts.get(w, 0) + 1\nreturn counts")
    return fn(r, "word_freq", (m,), ["word_counts", "word_freq", "frequencies"], S, ["str"], "dict",
              f"Return a dict that maps each word of $a0 (split on whitespace, lower-cased) with at least {m} "
              f"characters to the number of times it occurs.", [(body, "Count lower-cased words in a dict.")],
              [(sentence(r, r.randint(2, 8)).replace("a", "A", 1),) for _ in range(2)] + [("",)],
              lambda s: dict(collections.Counter(w for w in s.lower().split() if len(w) >= m)))


def invert(r):
    lists = r.choice([False, True])
    if lists:
        doc = "Return a dict mapping each value of $a0 to the sorted list of the keys that have that value."
        body = "out = {}\nfor key in sorted($a0):\n    out.setdefault($a0[key], []).append(key)\nreturn out"

        def ref(d):
            return {v: sorted(k for k in d if d[k] == v) for v in set(d.values())}
        cases = [({c: r.randint(0, 3) for c in r.sample("abcde", r.randint(0, 5))},) for _ in range(3)]
    else:
        doc = "The values of $a0 are all different. Return the inverse dict, mapping each value to its key."
        body = "return {v: k for k, v in $a0.items()}"
        ref = lambda d: dict(zip(d.values(), d.keys()))  # noqa: E731
        cases = [(dict(zip(r.sample(["x", "y", "z", "w"], 3), r.sample(range(10), 3))),), ({},)]
    return fn(r, "invert", (lists,), ["invert", "inverse", "reverse_mapping"], D, ["dict"], "dict", doc,
              [(body, "Group the keys by value, visiting the keys in sorted order." if lists else "Swap keys and values.")], cases, ref)


def group_words(r):
    by = r.choice(["first letter", "length"])
    k = "w[0]" if by == "first letter" else "len(w)"
    body = f"groups = {{}}\nfor w in $a0:\n    groups.setdefault({k}, []).append(w)\nreturn groups"

    def ref(ws):
        out = collections.defaultdict(list)
        for w in ws:
            out[w[:1] if by == "first letter" else len(w)].append(w)
        return dict(out)
    return fn(r, "group_words", (by,), ["group_words", f"group_by_{by.split()[-1]}", "bucket_words"],
              (("words",), ("names",), ("items",)), ["list[str]"], "dict",
              f"Return a dict mapping each {by} to the list of the words of $a0 with that {by}, in their original "
              f"order (all words are non-empty).", [(body, "setdefault builds the groups in one pass.")],
              [(r.sample(sorted(set(sentence(r, 9).split())), 3),), ([],)], ref)


def merge(r):
    op = r.choice(["sum", "larger", "smaller"])
    expr = {"sum": "out[k] + v", "larger": "max(out[k], v)", "smaller": "min(out[k], v)"}[op]
    body = f"out = dict($a0)\nfor k, v in $a1.items():\n    out[k] = {expr} if k in out else v\nreturn out"
    f = {"sum": lambda x, y: x + y, "larger": max, "smaller": min}[op]

    def ref(a, b):
        return {k: f(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in set(a) | set(b)}
    mk = lambda: {c: r.randint(-5, 9) for c in r.sample("pqrst", r.randint(0, 4))}  # noqa: E731
    return fn(r, "merge", (op,), ["merge", "merge_counts", "combine"], (("a", "b"), ("left", "right"), ("d1", "d2")),
              ["dict", "dict"], "dict",
              f"Merge the dicts $a0 and $a1 into a new dict: a key in only one of them keeps its value; a key in "
              f"both gets the {op} of its two values.", [(body, "Copy the first dict and fold in the second.")],
              [(mk(), mk()) for _ in range(3)], ref)


def keys_above(r):
    t = r.randint(0, 10)
    return fn(r, "keys_above", (t,), ["keys_above", "over_threshold", "big_keys"], D, ["dict"], "list",
              f"Return the sorted list of the keys of $a0 whose value is greater than {t}.",
              [(f"return sorted(k for k, v in $a0.items() if v > {t})", "Filter the items, then sort the keys.")],
              [({w: r.randint(0, 20) for w in r.sample(sorted(set(sentence(r, 8).split())), 2)},) for _ in range(2)] + [({},)],
              lambda d: sorted(filter(lambda k: d[k] > t, d)))


def most_common_char(r):
    alpha = r.choice([False, True])
    loop = "sorted(counts)" if alpha else "counts"
    body = (f"counts = {{}}\nfor ch in $a0:\n    if ch != ' ':\n        counts[ch] = counts.get(ch, 0) + 1\n"
            f"best = ''\nfor ch in {loop}:\n    if best == '' or counts[ch] > counts[best]:\n        best = ch\nreturn best")

    def ref(s):
        c = collections.Counter(s.replace(" ", ""))
        if not c:
            return ""
        top = max(c.values())
        cands = [ch for ch in c if c[ch] == top]
        return min(cands) if alpha else min(cands, key=s.index)
    tie = "comes first alphabetically" if alpha else "appears first in $a0"
    return fn(r, "most_common_char", (alpha,), ["most_common", "mode_char", "top_char"], S, ["str"], "str",
              f"Return the character that occurs most often in $a0, ignoring spaces. On a tie return the one that "
              f"{tie}. Return '' when $a0 has no characters other than spaces.",
              [(body, "Count the characters, then keep the best in the tie-break order.")],
              [(sentence(r, 3),), ("ba ab",), ("",), ("zzy",)], ref)


def histogram(r):
    w = r.randint(2, 10)
    body = f"out = {{}}\nfor x in $a0:\n    out[x // {w}] = out.get(x // {w}, 0) + 1\nreturn out"
    return fn(r, "histogram", (w,), ["histogram", "bucket_counts", "bin_counts"], XS, ["list[int]"], "dict",
              f"Return a dict mapping each bucket index x // {w} to how many elements x of $a0 fall in that bucket.",
              [(body, f"Integer-divide by {w} and count per bucket.")],
              [(ints(r, r.randint(3, 9), -10, 40),) for _ in range(2)] + [([],)],
              lambda xs: dict(collections.Counter(math.floor(v / w) for v in xs)))


# ---- integer maths ---------------------------------------------------------------------------

def _primes_below(n):
    return [p for p in range(2, n) if all(p % q for q in range(2, math.isqrt(p) + 1))]


def primes(r):
    mode = r.choice(["is_prime", "count_below", "nth"])
    if mode == "is_prime":
        doc = "Return True if $a0 is a prime number and False otherwise (numbers below 2 are not prime)."
        body = "if $a0 < 2:\n    return False\nfor d in range(2, int($a0 ** 0.5) + 1):\n    if $a0 % d == 0:\n" \
               "        return False\nreturn True"
        cases, ref = [(v,) for v in [r.randint(0, 60), 97, 91, 1, 2]], lambda n: n in _primes_below(n + 1)
    elif mode == "count_below":
        doc = "Return how many prime numbers are smaller than $a0."
        body = "return sum(1 for m in range(2, $a0) if all(m % d for d in range(2, int(m ** 0.5) + 1)))"
        cases, ref = [(v,) for v in [r.randint(3, 80), 2, 10]], lambda n: len(_primes_below(n))
    else:
        doc = "Return the $a0-th prime number, counting from 1 (the 1st prime is 2)."
        body = "found = 0\nm = 1\nwhile found < $a0:\n    m += 1\n    if all(m % d for d in range(2, int(m ** 0.5) + 1)):\n" \
               "        found += 1\nreturn m"
        cases, ref = [(v,) for v in [r.randint(1, 25), 1, 5]], lambda n: _primes_below(200)[n - 1]
    return fn(r, "primes", (mode,), {"is_prime": ["is_prime", "prime"], "count_below": ["count_primes", "prime_count"],
                                     "nth": ["nth_prime", "prime_at"]}[mode], N, ["int"], "", doc,
              [(body, "Trial division up to the square root.")], cases, ref)


def digit_sum(r):
    b = r.randint(2, 10)
    body = f"total = 0\nwhile $a0 > 0:\n    total += $a0 % {b}\n    $a0 //= {b}\nreturn total"

    @functools.lru_cache(maxsize=None)
    def ref(n):
        return 0 if n == 0 else n % b + ref(n // b)
    return fn(r, "digit_sum", (b,), ["digit_sum", f"digit_sum_base{b}", "sum_digits"], N, ["int"], "int",
              f"Return the sum of the digits of the non-negative integer $a0 written in base {b}.",
              [(body, f"Peel off base-{b} digits with % and //.")], [(v,) for v in [0, r.randint(1, 9999), b ** 3 - 1]], ref)


def fizzbuzz(r):
    a, b = r.choice([(2, 3), (3, 5), (2, 5), (3, 4), (3, 7), (4, 5), (5, 7)])
    wa, wb = r.choice([("Fizz", "Buzz"), ("Foo", "Bar"), ("Ping", "Pong"), ("Tick", "Tock")])
    body = f"""
        out = []
        for i in range(1, $a0 + 1):
            if i % {a * b} == 0:
                out.append('{wa}{wb}')
            elif i % {a} == 0:
                out.append('{wa}')
            elif i % {b} == 0:
                out.append('{wb}')
            else:
                out.append(str(i))
        return out"""

    def ref(n):
        return [(wa if i % a == 0 else "") + (wb if i % b == 0 else "") or str(i) for i in range(1, n + 1)]
    return fn(r, "fizzbuzz", (a, b, wa, wb), ["fizzbuzz", f"{wa.lower()}{wb.lower()}", "play"], N, ["int"], "list[str]",
              f"Return a list of strings for the numbers 1 to $a0: '{wa}{wb}' for multiples of both {a} and {b}, "
              f"'{wa}' for the other multiples of {a}, '{wb}' for the other multiples of {b}, and the number itself "
              f"as a string otherwise.", [(dedent(body), f"Test divisibility by {a * b} first.")],
              [(r.randint(5, 25),), (1,), (0,)], ref)


def collatz(r):
    peak = r.choice([False, True])
    track = "best = max(best, $a0)" if peak else "steps += 1"
    body = (f"{'best = $a0' if peak else 'steps = 0'}\nwhile $a0 != 1:\n    $a0 = $a0 // 2 if $a0 % 2 == 0 else 3 * $a0 + 1\n"
            f"    {track}\nreturn {'best' if peak else 'steps'}")

    def ref(n):
        seq = [n]
        while seq[-1] != 1:
            seq.append(seq[-1] // 2 if seq[-1] % 2 == 0 else 3 * seq[-1] + 1)
        return max(seq) if peak else len(seq) - 1
    what = "the largest value reached (including $a0 itself)" if peak else "how many steps it takes to reach 1"
    return fn(r, "collatz", (peak,), ["collatz_peak", "hailstone_max"] if peak else ["collatz_steps", "hailstone"],
              N, ["int"], "int", f"Start from the positive integer $a0 and repeatedly halve it when even or replace it "
              f"by 3 * n + 1 when odd, until it reaches 1. Return {what}.",
              [(body, "Simulate the process.")], [(v,) for v in [1, r.randint(2, 50), 27, 6]], ref)


def divisors(r):
    proper_sum = r.choice([False, True])
    expr = "sum(d for d in range(1, $a0) if $a0 % d == 0)" if proper_sum else \
        "sum(1 for d in range(1, $a0 + 1) if $a0 % d == 0)"

    def ref(n):
        ds = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
        return sum(ds) - n if proper_sum else len(ds)
    what = "the sum of the proper divisors of $a0 (its divisors smaller than itself)" if proper_sum else \
        "the number of positive divisors of $a0"
    return fn(r, "divisors", (proper_sum,), ["aliquot_sum", "proper_divisor_sum"] if proper_sum else
              ["count_divisors", "num_divisors"], N, ["int"], "int", f"Return {what}; $a0 is a positive integer.",
              [(f"return {expr}", "Test every candidate divisor.")], [(v,) for v in [1, 12, r.randint(2, 100), 28]], ref)


def to_base(r):
    b = r.randint(2, 9)
    body = f"if $a0 == 0:\n    return '0'\ndigits = ''\nwhile $a0 > 0:\n    digits = str($a0 % {b}) + digits\n" \
           f"    $a0 //= {b}\nreturn digits"

    def ref(n):
        return "0" if n == 0 else (ref(n // b).lstrip("0") + str(n % b))
    return fn(r, "to_base", (b,), ["to_base", f"to_base{b}", "in_base"], N, ["int"], "str",
              f"Return the digits of the non-negative integer $a0 written in base {b}, as a string ('0' for zero).",
              [(body, "Collect remainders, most significant digit first.")], [(v,) for v in [0, r.randint(1, 500), b]], ref)


def sum_multiples(r):
    a, b = sorted(r.sample(range(2, 8), 2))
    return fn(r, "sum_multiples", (a, b), ["sum_multiples", "euler_one", "multiples_total"], N, ["int"], "int",
              f"Return the sum of all positive integers below $a0 that are multiples of {a} or {b}.",
              [(f"return sum(i for i in range(1, $a0) if i % {a} == 0 or i % {b} == 0)", "Sum over a filtered range.")],
              [(v,) for v in [r.randint(10, 100), 1, a * b]],
              lambda n: sum(set(range(a, n, a)) | set(range(b, n, b))))


def polygonal(r):
    s = r.randint(3, 8)
    name = {3: "triangular", 4: "square", 5: "pentagonal", 6: "hexagonal", 7: "heptagonal", 8: "octagonal"}[s]
    return fn(r, "polygonal", (s,), [name, f"{name}_number", "polygonal"], N, ["int"], "int",
              f"Return the $a0-th {name} number, P(n) = ((s - 2) * n * n - (s - 4) * n) // 2 with s = {s}.",
              [(f"return ({s - 2} * $a0 * $a0 - ({s - 4}) * $a0) // 2", "Apply the closed formula.")],
              [(v,) for v in [1, 2, r.randint(3, 30)]], lambda n: sum(1 + (s - 2) * i for i in range(n)))


def gcd_lcm(r):
    lcm = r.choice([False, True])
    body = ("out = 1\nfor x in $a0:\n    out = out * x // math.gcd(out, x)\nreturn out" if lcm else
            "out = 0\nfor x in $a0:\n    out = math.gcd(out, x)\nreturn out")
    what = "least common multiple" if lcm else "greatest common divisor"

    def ref(xs):
        return functools.reduce(math.lcm, xs, 1) if lcm else functools.reduce(math.gcd, xs, 0)
    spec = fn(r, "gcd_lcm", (lcm,), ["lcm_all", "lcm_list"] if lcm else ["gcd_all", "gcd_list"], XS, ["list[int]"],
              "int", f"Return the {what} of the positive integers in $a0 (the list is not empty).",
              [(body, "Fold the list pairwise with math.gcd.")],
              [([r.choice([2, 3, 4, 6]) * r.randint(1, 9) for _ in range(3)],) for _ in range(3)], ref)
    return dataclasses.replace(spec, solution="import math\n\n\n" + spec.solution)


# ---- recursion -------------------------------------------------------------------------------

def fib_custom(r):
    a, b = r.randint(0, 3), r.randint(1, 4)
    body = f"if $a0 == 0:\n    return {a}\nif $a0 == 1:\n    return {b}\nreturn {{name}}($a0 - 1) + {{name}}($a0 - 2)"

    def ref(n):
        x, y = a, b
        for _ in range(n):
            x, y = y, x + y
        return x
    spec = fn(r, "fib_custom", (a, b), ["fib", "sequence", "fib_like", "lucas_like"], N, ["int"], "int",
              f"A sequence has f(0) = {a}, f(1) = {b} and f(n) = f(n - 1) + f(n - 2). Return f($a0), using recursion.",
              [(body, "Recurse on the two previous terms.")], [(v,) for v in [0, 1, r.randint(2, 15)]], ref, 3)
    return dataclasses.replace(spec, solution=spec.solution.replace("{name}", spec.name))


def power_mod(r):
    m = r.choice([10, 97, 1000, 1_000_007])
    body = (f"if $a1 == 0:\n    return 1 % {m}\nhalf = {{name}}($a0, $a1 // 2)\nresult = half * half % {m}\n"
            f"if $a1 % 2:\n    result = result * $a0 % {m}\nreturn result")
    spec = fn(r, "power_mod", (m,), ["power_mod", "fast_pow", "mod_pow"], (("base", "exp"), ("b", "e"), ("x", "n")),
              ["int", "int"], "int", f"Return ($a0 ** $a1) % {m} for a non-negative exponent $a1, by recursive squaring.",
              [(body, "Square the half power, multiply once more for odd exponents.")],
              [(r.randint(2, 50), r.randint(0, 40)) for _ in range(3)] + [(7, 0)], lambda x, e: pow(x, e, m), 3)
    return dataclasses.replace(spec, solution=spec.solution.replace("{name}", spec.name))


def nested(r):
    mode = r.choice(["flatten", "sum", "depth"])
    body = {"flatten": "out = []\nfor x in $a0:\n    if isinstance(x, list):\n        out.extend({name}(x))\n"
                       "    else:\n        out.append(x)\nreturn out",
            "sum": "return sum({name}(x) if isinstance(x, list) else x for x in $a0)",
            "depth": "return 1 + max([{name}(x) for x in $a0 if isinstance(x, list)], default=0)"}[mode]
    doc = {"flatten": "Return the flat list of all integers in the nested list $a0, in order.",
           "sum": "Return the sum of all integers in the nested list $a0.",
           "depth": "Return the nesting depth of the list $a0: 1 for a list without inner lists (also the empty "
                    "list), plus one for every level of nesting."}[mode]

    def ref(xs):
        if mode == "depth":
            return 1 + max((ref(x) for x in xs if type(x) is list), default=0)
        flat, stack = [], [iter(xs)]
        while stack:
            for x in stack[-1]:
                if type(x) is list:
                    stack.append(iter(x))
                    break
                flat.append(x)
            else:
                stack.pop()
        return flat if mode == "flatten" else sum(flat)
    cases = [([1, [2, [3, r.randint(4, 9)]], r.randint(0, 5)],), ([],), ([[[]], [r.randint(1, 9)]],),
             ([r.randint(1, 9), r.randint(1, 9)],)]
    spec = fn(r, "nested", (mode,), {"flatten": ["flatten", "flat"], "sum": ["deep_sum", "nested_sum"],
                                    "depth": ["depth", "max_depth"]}[mode], XS, ["list"], "", doc,
              [(body, "Recurse into the inner lists.")], cases, ref, 3)
    return dataclasses.replace(spec, solution=spec.solution.replace("{name}", spec.name))


def climb(r):
    k = r.randint(2, 4)
    body = f"if $a0 < 0:\n    return 0\nif $a0 == 0:\n    return 1\nreturn sum({{name}}($a0 - s) for s in range(1, {k + 1}))"

    def ref(n):
        ways = [1] + [0] * n
        for i in range(1, n + 1):
            ways[i] = sum(ways[max(0, i - k):i])
        return ways[n]
    spec = fn(r, "climb", (k,), ["climb", "count_ways", "stair_ways"], N, ["int"], "int",
              f"Return the number of ways to climb $a0 stairs taking 1 to {k} steps at a time (there is 1 way to "
              f"climb 0 stairs).", [(body, f"Recurse on the last step size, 1 to {k}.")],
              [(v,) for v in [0, 1, r.randint(3, 12)]], ref, 3)
    return dataclasses.replace(spec, solution=spec.solution.replace("{name}", spec.name))


def kbonacci(r):
    k = r.randint(3, 5)
    body = f"if $a0 < {k - 1}:\n    return 0\nif $a0 == {k - 1}:\n    return 1\n" \
           f"return sum({{name}}($a0 - j) for j in range(1, {k + 1}))"

    def ref(n):
        seq = [0] * (k - 1) + [1]
        while len(seq) <= n:
            seq.append(sum(seq[-k:]))
        return seq[n]
    spec = fn(r, "kbonacci", (k,), ["kbonacci", f"{['', '', '', 'tri', 'tetra', 'penta'][k]}bonacci", "nacci"], N,
              ["int"], "int", f"The sequence starts with {k - 1} zeros followed by a 1, and every later term is the sum "
              f"of the previous {k} terms. Return the term at index $a0 (counting from 0), recursively.",
              [(body, f"Recurse on the previous {k} terms.")], [(v,) for v in [0, k - 1, r.randint(k, 14)]], ref, 3)
    return dataclasses.replace(spec, solution=spec.solution.replace("{name}", spec.name))


def bsearch(r):
    insertion = r.choice([False, True])
    if insertion:
        body = "if lo >= hi:\n    return lo\nmid = (lo + hi) // 2\nif $a0[mid] < $a1:\n" \
               "    return {name}($a0, $a1, mid + 1, hi)\nreturn {name}($a0, $a1, lo, mid)"
        doc = "Return the leftmost index at which $a1 could be inserted into the sorted list $a0 keeping it sorted"
        ref = lambda xs, t: sum(1 for v in xs if v < t)  # noqa: E731
    else:
        body = "if lo >= hi:\n    return -1\nmid = (lo + hi) // 2\nif $a0[mid] == $a1:\n    return mid\n" \
               "if $a0[mid] < $a1:\n    return {name}($a0, $a1, mid + 1, hi)\nreturn {name}($a0, $a1, lo, mid)"
        doc = "Return an index of $a1 in the sorted list $a0 of distinct integers, or -1 if it is absent"
        ref = lambda xs, t: xs.index(t) if t in xs else -1  # noqa: E731
    xs = sorted(r.sample(range(-20, 40), r.randint(3, 9)))
    spec = fn(r, "bsearch", (insertion,), ["bisect_left", "insertion_point"] if insertion else ["bsearch", "binary_search"],
              (("xs", "target"), ("items", "x"), ("values", "key")), ["list[int]", "int"], "int",
              doc + ", by recursive binary search over the half-open range [lo, hi).",
              [(body, "Halve the range on each call.")],
              [(xs, xs[1]), (xs, xs[-1] + 1), (xs, xs[0] - 1), ([], 3)], ref, 3)
    params = spec.signature[spec.signature.index("(") + 1:spec.signature.index(")")]
    signature = spec.signature.replace(params + ")", params + ", lo=0, hi=None)")
    solution = spec.solution.replace(spec.signature, signature)
    first = params.split(",")[0].split(":")[0]
    solution = solution.replace(signature + "\n", f"{signature}\n    if hi is None:\n        hi = len({first})\n", 1)
    return dataclasses.replace(spec, signature=signature, solution=solution.replace("{name}", spec.name))


FUNCTIONS_DICT = (word_freq, invert, group_words, merge, keys_above, most_common_char, histogram)
FUNCTIONS_MATH = (primes, digit_sum, fizzbuzz, collatz, divisors, to_base, sum_multiples, polygonal, gcd_lcm)
FUNCTIONS_RECURSION = (fib_custom, power_mod, nested, climb, kbonacci, bsearch)

