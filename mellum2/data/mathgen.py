"""A generated math corpus of worked problems: the `math` domain of the embedded default corpus.

No network and no dataset download, so the math share of Mellum 2's mixture (6% / 14% / 18%) is
filled by problems drawn from templates, each solved step by step with the exact answer computed in
Python: arithmetic (column-wise sums, distributive products, long division), fractions, percentages,
gcd/lcm by Euclid, prime factorisation, linear equations, 2x2 systems by elimination, quadratics with
integer roots, arithmetic and geometric sequences, statistics, and word problems (distance/rate,
shopping with discounts, work rates, ages, mixtures). A document is a worksheet of 1-6 problems in one
of several layouts, so documents are not near-duplicates of each other.

Deterministic: document i depends only on (seed, i) (`random.Random(f"{seed}:{i}")`), so any
prefix of the corpus is reproducible and the generator is a pure function.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Callable, Iterator

Problem = tuple[str, list[str], str]  # statement, solution steps, final answer

NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara"]
ITEMS = [("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"), ("ticket", "tickets"),
         ("book", "books"), ("cable", "cables"), ("mug", "mugs"), ("plant", "plants"), ("shirt", "shirts")]


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _poly(*terms: tuple[int, str]) -> str:
    """'3x - 4y + 2' from ((3, 'x'), (-4, 'y'), (2, '')); unit coefficients and zero terms elided."""
    out = []
    for c, var in terms:
        if c == 0:
            continue
        mag = "" if abs(c) == 1 and var else str(abs(c))
        sign = ("-" if c < 0 else "") if not out else (" - " if c < 0 else " + ")
        out.append(f"{sign}{mag}{var}")
    return "".join(out) or "0"


def _p(v: int) -> str:
    return f"({v})" if v < 0 else str(v)


def _money(q: Fraction) -> str:
    """An exact decimal for amounts whose denominator divides 100 (percentages, prices)."""
    if (q * 100).denominator != 1:
        return _frac(q)
    cents = int(q * 100)
    return str(cents // 100) if cents % 100 == 0 else f"{cents // 100}.{cents % 100:02d}"


def addition(r: random.Random) -> Problem:
    a, b = r.randint(100, 99999), r.randint(100, 99999)
    steps, carry, digits = [], 0, []
    sa, sb = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(sa), len(sb))):
        da = int(sa[i]) if i < len(sa) else 0
        db = int(sb[i]) if i < len(sb) else 0
        s = da + db + carry
        steps.append(f"Place {10 ** i}: {da} + {db}" + (f" + carry {carry}" if carry else "") + f" = {s}, "
                     f"write {s % 10}" + (f", carry {s // 10}" if s >= 10 else "") + ".")
        carry = s // 10
        digits.append(s % 10)
    if carry:
        steps.append(f"Write the final carry {carry}.")
    return f"Compute {a} + {b}.", steps, str(a + b)


def subtraction(r: random.Random) -> Problem:
    a, b = sorted((r.randint(50, 9999), r.randint(50, 9999)), reverse=True)
    hundreds = b // 100 * 100
    return (f"What is {a} - {b}?",
            [f"Split {b} as {hundreds} + {b - hundreds}.", f"{a} - {hundreds} = {a - hundreds}.",
             f"{a - hundreds} - {b - hundreds} = {a - b}."], str(a - b))


def product(r: random.Random) -> Problem:
    a, b = r.randint(12, 999), r.randint(12, 99)
    tens, ones = b // 10 * 10, b % 10
    return (f"Multiply {a} by {b}.",
            [f"Write {b} = {tens} + {ones}.", f"{a} x {tens} = {a * tens}.", f"{a} x {ones} = {a * ones}.",
             f"Add the partial products: {a * tens} + {a * ones} = {a * b}."], str(a * b))


def division(r: random.Random) -> Problem:
    d, q, rem = r.randint(3, 47), r.randint(11, 999), 0
    rem = r.randint(0, d - 1)
    n = d * q + rem
    return (f"Divide {n} by {d}. Give the quotient and the remainder.",
            [f"{d} x {q} = {d * q}, and {d} x {q + 1} = {d * (q + 1)} is larger than {n}.",
             f"So the quotient is {q} and the remainder is {n} - {d * q} = {rem}.",
             f"Check: {d} x {q} + {rem} = {n}."], f"{q} remainder {rem}")


def fractions(r: random.Random) -> Problem:
    a, b, c, d = r.randint(1, 9), r.randint(2, 12), r.randint(1, 9), r.randint(2, 12)
    op = r.choice("+-")
    num = a * d + c * b if op == "+" else a * d - c * b
    result = Fraction(num, b * d)
    g = math.gcd(num, b * d)
    steps = [f"Common denominator: {b} x {d} = {b * d}.",
             f"{a}/{b} = {a * d}/{b * d} and {c}/{d} = {c * b}/{b * d}.",
             f"{a * d} {op} {c * b} = {num}, so the result is {num}/{b * d}."]
    if abs(g) > 1:
        steps.append(f"Divide numerator and denominator by {abs(g)}: {_frac(result)}.")
    return f"Simplify {a}/{b} {op} {c}/{d}.", steps, _frac(result)


def percentage(r: random.Random) -> Problem:
    p, base = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 60, 75]), r.randint(2, 400) * 10
    val = Fraction(p * base, 100)
    return (f"What is {p}% of {base}?",
            [f"{p}% means {p}/100.", f"{p}/100 x {base} = {p * base}/100 = {_money(val)}."], _money(val))


def gcd_lcm(r: random.Random) -> Problem:
    g = r.randint(2, 30)
    a, b = g * r.randint(2, 40), g * r.randint(2, 40)
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} x {y} + {x % y}.")
        x, y = y, x % y
    lcm = a * b // x
    steps.append(f"The last non-zero remainder is {x}, so gcd({a}, {b}) = {x}.")
    steps.append(f"lcm = {a} x {b} / {x} = {lcm}.")
    return f"Find the greatest common divisor and least common multiple of {a} and {b}.", steps, f"{x}, {lcm}"


def factorise(r: random.Random) -> Problem:
    n = 1
    for _ in range(r.randint(2, 6)):
        n *= r.choice([2, 2, 3, 3, 5, 7, 11, 13])
    steps, m, factors, p = [], n, [], 2
    while m > 1:
        if m % p == 0:
            steps.append(f"{m} / {p} = {m // p}.")
            factors.append(p)
            m //= p
        else:
            p += 1
    return f"Write {n} as a product of primes.", steps, " x ".join(map(str, factors))


def linear(r: random.Random) -> Problem:
    a, x, b = r.choice([i for i in range(-12, 13) if i not in (0, 1)]), r.randint(-30, 30), r.randint(-50, 50)
    c = a * x + b
    lhs = _poly((a, "x"), (b, ""))
    return (f"Solve for x: {lhs} = {c}.",
            [f"Subtract {_p(b)} from both sides: {a}x = {c - b}.", f"Divide both sides by {a}: x = {x}.",
             f"Check: {a} x {_p(x)} {'+' if b >= 0 else '-'} {abs(b)} = {c}."], f"x = {x}")


def system(r: random.Random) -> Problem:
    x, y = r.randint(-9, 9), r.randint(-9, 9)
    a1, b1, a2, b2 = [r.choice([i for i in range(-6, 7) if i]) for _ in range(4)]
    if a1 * b2 - a2 * b1 == 0:
        a2 += 1 if a2 != -1 else 2
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    det = a1 * b2 - a2 * b1
    return (f"Solve the system: {_poly((a1, 'x'), (b1, 'y'))} = {c1} and {_poly((a2, 'x'), (b2, 'y'))} = {c2}.",
            [f"Multiply the first equation by {_p(b2)} and the second by {_p(b1)}.",
             f"Subtract: ({a1 * b2} - {_p(a2 * b1)})x = {c1 * b2} - {_p(c2 * b1)}, so {det}x = {c1 * b2 - c2 * b1}.",
             f"x = {x}.", f"Substitute into the first equation: {b1}y = {c1} - {_p(a1 * x)} = {c1 - a1 * x}, "
             f"so y = {y}."],
            f"x = {x}, y = {y}")


def quadratic(r: random.Random) -> Problem:
    p, q = r.randint(-12, 12), r.randint(-12, 12)
    b, c = -(p + q), p * q
    poly = _poly((1, "x^2"), (b, "x"), (c, ""))
    roots = sorted({p, q})
    return (f"Find the roots of {poly} = 0.",
            [f"Look for two numbers with product {c} and sum {-b}: {p} and {q}.",
             f"So {poly} = ({_poly((1, 'x'), (-p, ''))})({_poly((1, 'x'), (-q, ''))}).",
             f"Each factor gives a root: x = {p} or x = {q}."],
            ", ".join(f"x = {v}" for v in roots))


def arith_seq(r: random.Random) -> Problem:
    a, d, n = r.randint(-20, 50), r.randint(-9, 15), r.randint(6, 60)
    an = a + (n - 1) * d
    s = n * (a + an) // 2
    first = ", ".join(str(a + i * d) for i in range(4))
    return (f"The sequence {first}, ... is arithmetic. Find term {n} and the sum of the first {n} terms.",
            [f"The common difference is {d}.", f"Term {n} = {a} + ({n} - 1) x {d} = {an}.",
             f"Sum = {n} x ({a} + {an}) / 2 = {s}."], f"{an}; {s}")


def geom_seq(r: random.Random) -> Problem:
    a, q, n = r.randint(1, 9), r.choice([2, 3, -2, 5]), r.randint(4, 10)
    return (f"A geometric sequence starts {a}, {a * q}, {a * q * q}, ... What is term {n}?",
            [f"The ratio is {a * q} / {a} = {q}.", f"Term {n} = {a} x ({q})^{n - 1} = {a} x {q ** (n - 1)} "
             f"= {a * q ** (n - 1)}."], str(a * q ** (n - 1)))


def statistics(r: random.Random) -> Problem:
    xs = [r.randint(1, 99) for _ in range(r.choice([5, 6, 7, 8]))]
    s, srt = sorted(xs), sum(xs)
    mid = len(s) // 2
    med = Fraction(s[mid]) if len(s) % 2 else Fraction(s[mid - 1] + s[mid], 2)
    return (f"Find the mean and median of {', '.join(map(str, xs))}.",
            [f"Sum = {srt}; there are {len(xs)} values, so the mean is {srt}/{len(xs)} = {_frac(Fraction(srt, len(xs)))}.",
             f"Sorted: {', '.join(map(str, s))}.", f"The median is {_frac(med)}."],
            f"mean {_frac(Fraction(srt, len(xs)))}, median {_frac(med)}")


def word_distance(r: random.Random) -> Problem:
    name, v, t = r.choice(NAMES), r.randint(3, 90), r.randint(2, 9)
    return (f"{name} travels at {v} km per hour for {t} hours. How far does {name} travel?",
            ["Distance = speed x time.", f"{v} x {t} = {v * t}."], f"{v * t} km")


def word_shopping(r: random.Random) -> Problem:
    name, (one, many) = r.choice(NAMES), r.choice(ITEMS)
    n, price, off = r.randint(2, 12), r.randint(2, 40), r.choice([10, 20, 25, 50])
    total = n * price
    disc = Fraction(total * off, 100)
    return (f"{name} buys {n} {many} at ${price} per {one}. The shop gives {off}% off the total. "
            f"How much does {name} pay?",
            [f"Before the discount: {n} x {price} = {total} dollars.", f"The discount is {off}% of {total} = {_money(disc)}.",
             f"{total} - {_money(disc)} = {_money(total - disc)}."], f"${_money(total - disc)}")


def word_work(r: random.Random) -> Problem:
    a, b = r.choice([(2, 3), (3, 6), (4, 12), (6, 12), (5, 20), (10, 15), (12, 24)])
    t = Fraction(a * b, a + b)
    return (f"One pipe fills a tank in {a} hours and another in {b} hours. How long do they take together?",
            [f"Rates: 1/{a} and 1/{b} of the tank per hour.", f"Together: 1/{a} + 1/{b} = {_frac(Fraction(1, a) + Fraction(1, b))}.",
             f"Time = 1 / ({_frac(Fraction(1, a) + Fraction(1, b))}) = {_frac(t)} hours."], f"{_frac(t)} hours")


def word_age(r: random.Random) -> Problem:
    p, c = r.sample(NAMES, 2)
    child, k, yrs = r.randint(3, 15), r.randint(2, 4), r.randint(2, 10)
    parent = k * child
    return (f"{p} is {k} times as old as {c}. In {yrs} years their ages will add up to {parent + child + 2 * yrs}. "
            f"How old is {c} now?",
            [f"Let {c}'s age be a, so {p} is {k}a.", f"In {yrs} years: (a + {yrs}) + ({k}a + {yrs}) = {parent + child + 2 * yrs}.",
             f"{k + 1}a + {2 * yrs} = {parent + child + 2 * yrs}, so {k + 1}a = {parent + child}, a = {child}."],
            str(child))


FAMILIES: tuple[Callable[[random.Random], Problem], ...] = (
    addition, subtraction, product, division, fractions, percentage, gcd_lcm, factorise, linear, system,
    quadratic, arith_seq, geom_seq, statistics, word_distance, word_shopping, word_work, word_age)

LAYOUTS = (
    ("Problem {i}. {q}", "Solution.", "Answer: {a}"),
    ("Q{i}: {q}", "Step by step:", "A{i}: {a}"),
    ("**Exercise {i}.** {q}", "*Solution.*", "**Answer:** {a}"),
    ("{i}) {q}", "Working:", "Therefore the answer is {a}."),
)
TITLES = ("Worksheet {n}: mixed practice", "Practice set {n}", "Homework {n} with worked solutions",
          "Exercises, set {n}", "Review problems ({n})")


def worksheet(seed: int, index: int) -> str:
    """Document `index` of the corpus for `seed`: a titled worksheet of 1-6 worked problems."""
    r = random.Random(f"{seed}:{index}")
    head, sol, ans = r.choice(LAYOUTS)
    bullet = r.choice(("- ", "", "* "))
    parts = [r.choice(TITLES).format(n=index)]
    for i in range(1, r.randint(1, 6) + 1):
        q, steps, a = r.choice(FAMILIES)(r)
        body = "\n".join(bullet + s for s in steps)
        parts.append(f"{head.format(i=i, q=q)}\n{sol}\n{body}\n{ans.format(i=i, a=a)}")
    return "\n\n".join(parts) + "\n"


def generate(seed: int = 0, max_bytes: int = 8 << 20) -> Iterator[tuple[int, str]]:
    """(index, worksheet) until about `max_bytes` of UTF-8 text have been produced."""
    if max_bytes <= 0:
        return
    total, i = 0, 0
    while total < max_bytes:
        text = worksheet(seed, i)
        total += len(text.encode("utf-8"))
        yield i, text
        i += 1
