"""The three local tools of the embedded tool-use data: their JSON schemas (OpenAI `tools` entries) and
deterministic implementations, used to generate the tool responses of SFT dialogues and usable by an
RL rollout that executes calls.

- `calculator(expression)`: exact arithmetic on a parsed AST (integers and fractions; + - * / // % **,
  parentheses, abs/min/max/round/sqrt); anything else is an error naming the offending piece. `^` is
  refused with a hint to use `**` (a common slip, and the tool-error dialogues rely on it).
- `lookup(entity, field)`: a small reference table (programming languages, chemical elements,
  countries, HTTP status codes); unknown names get an error with close matches.
- `python(code)`: runs a short program and returns what it prints. Generation never executes it (the
  expected output is computed by the generator and a test checks it against a real run); an RL
  rollout must pass a sandboxed runner to `run_tool`.

Every tool returns a JSON string: `{"result": ...}` / `{"entity", "field", "value"}` on success,
`{"error": "..."}` on failure.
"""
from __future__ import annotations

import ast
import difflib
import json
import math
import operator
from fractions import Fraction
from typing import Callable

LANGUAGES = {  # name: (creator, year of first appearance)
    "Python": ("Guido van Rossum", 1991), "Java": ("James Gosling", 1995), "C": ("Dennis Ritchie", 1972),
    "C++": ("Bjarne Stroustrup", 1985), "JavaScript": ("Brendan Eich", 1995), "Ruby": ("Yukihiro Matsumoto", 1995),
    "Perl": ("Larry Wall", 1987), "PHP": ("Rasmus Lerdorf", 1995), "Fortran": ("John Backus", 1957),
    "Pascal": ("Niklaus Wirth", 1970), "Scala": ("Martin Odersky", 2004), "Kotlin": ("JetBrains", 2011),
    "C#": ("Anders Hejlsberg", 2000), "Go": ("Robert Griesemer, Rob Pike and Ken Thompson", 2009),
    "Swift": ("Chris Lattner", 2014), "TypeScript": ("Anders Hejlsberg", 2012), "Erlang": ("Joe Armstrong", 1986),
    "Elixir": ("José Valim", 2012),
}
ELEMENTS = {  # name: (symbol, atomic number)
    "hydrogen": ("H", 1), "helium": ("He", 2), "lithium": ("Li", 3), "carbon": ("C", 6), "nitrogen": ("N", 7),
    "oxygen": ("O", 8), "sodium": ("Na", 11), "magnesium": ("Mg", 12), "aluminium": ("Al", 13),
    "silicon": ("Si", 14), "sulfur": ("S", 16), "chlorine": ("Cl", 17), "potassium": ("K", 19),
    "calcium": ("Ca", 20), "iron": ("Fe", 26), "copper": ("Cu", 29), "zinc": ("Zn", 30), "silver": ("Ag", 47),
    "tin": ("Sn", 50), "gold": ("Au", 79), "mercury": ("Hg", 80), "lead": ("Pb", 82), "uranium": ("U", 92),
}
COUNTRIES = {  # name: (capital, continent)
    "France": ("Paris", "Europe"), "Japan": ("Tokyo", "Asia"), "Canada": ("Ottawa", "North America"),
    "Australia": ("Canberra", "Oceania"), "Brazil": ("Brasília", "South America"), "Kenya": ("Nairobi", "Africa"),
    "Norway": ("Oslo", "Europe"), "Egypt": ("Cairo", "Africa"), "India": ("New Delhi", "Asia"),
    "Germany": ("Berlin", "Europe"), "Peru": ("Lima", "South America"), "Chile": ("Santiago", "South America"),
    "Mexico": ("Mexico City", "North America"), "Vietnam": ("Hanoi", "Asia"), "Morocco": ("Rabat", "Africa"),
    "New Zealand": ("Wellington", "Oceania"), "Poland": ("Warsaw", "Europe"),
    "Argentina": ("Buenos Aires", "South America"), "Nigeria": ("Abuja", "Africa"),
    "South Korea": ("Seoul", "Asia"), "Portugal": ("Lisbon", "Europe"),
}
HTTP = {"200": "OK", "201": "Created", "204": "No Content", "301": "Moved Permanently", "302": "Found",
        "304": "Not Modified", "400": "Bad Request", "401": "Unauthorized", "403": "Forbidden", "404": "Not Found",
        "405": "Method Not Allowed", "409": "Conflict", "418": "I'm a teapot", "429": "Too Many Requests",
        "500": "Internal Server Error", "502": "Bad Gateway", "503": "Service Unavailable", "504": "Gateway Timeout"}

TABLE: dict[str, dict[str, object]] = {
    **{k: {"creator": c, "year": y} for k, (c, y) in LANGUAGES.items()},
    **{k: {"symbol": s, "atomic_number": n} for k, (s, n) in ELEMENTS.items()},
    **{k: {"capital": c, "continent": m} for k, (c, m) in COUNTRIES.items()},
    **{k: {"meaning": v} for k, v in HTTP.items()},
}
FIELDS = ("creator", "year", "symbol", "atomic_number", "capital", "continent", "meaning")


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


CALCULATOR = _fn("calculator", "Evaluate an arithmetic expression exactly. Supports + - * / // % ** and parentheses, "
                 "and the functions abs, min, max, round and sqrt.",
                 {"expression": {"type": "string", "description": "The expression, e.g. \"(12 + 7) * 3\"."}},
                 ["expression"])
PYTHON = _fn("python", "Run a short Python 3 program and return what it prints to standard output, or the error.",
             {"code": {"type": "string", "description": "The program; print the values you need."}}, ["code"])
LOOKUP = _fn("lookup", "Look up a fact in a small reference table: programming languages (creator, year of first "
             "appearance), chemical elements (symbol, atomic_number), countries (capital, continent) and HTTP "
             "status codes (meaning).",
             {"entity": {"type": "string", "description": "What to look up, e.g. \"Python\", \"iron\", \"Japan\", \"404\"."},
              "field": {"type": "string", "enum": list(FIELDS), "description": "Which fact."}},
             ["entity", "field"])
TOOLS = {"calculator": CALCULATOR, "python": PYTHON, "lookup": LOOKUP}


class ToolError(ValueError):
    """A call the tool cannot answer; the message is what the tool returns as its error."""


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: None}
_FUNCS = {"abs": abs, "min": min, "max": max, "round": None, "sqrt": None}


def _eval(node) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1 or abs(b) > 1000 or (abs(a.numerator) > 1 and abs(b) > 200):
                raise ToolError("exponent must be a whole number of moderate size")
            if a == 0 and b < 0:
                raise ToolError("division by zero")
            return a ** int(b)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise ToolError("division by zero")
        return Fraction(_BIN[type(node.op)](a, b))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ToolError("'^' is not supported; use ** for powers")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        args = [_eval(a) for a in node.args]
        name = node.func.id
        if name == "sqrt":
            if len(args) != 1 or args[0] < 0:
                raise ToolError("sqrt takes one non-negative number")
            root = Fraction(math.isqrt(args[0].numerator), math.isqrt(args[0].denominator))
            return root if root * root == args[0] else Fraction(math.sqrt(args[0]))
        if name == "round":
            return Fraction(round(args[0], int(args[1]) if len(args) > 1 else None))
        if name == "abs":
            if len(args) != 1:
                raise ToolError("abs takes one number")
            return abs(args[0])
        if not args:
            raise ToolError(f"{name} needs at least one argument")
        return _FUNCS[name](args)
    piece = ast.unparse(node) if isinstance(node, ast.AST) else str(node)
    raise ToolError(f"unsupported expression: {piece}")


def format_number(q: Fraction) -> int | float:
    """An int when whole, an exact decimal string when it terminates, else a float (12 significant digits)."""
    if q.denominator == 1:
        return int(q)
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    digits = 0
    while d == 1 and (q * 10 ** digits).denominator != 1 and digits <= 12:
        digits += 1
    return float(f"{float(q):.{digits}f}") if d == 1 and digits <= 12 else float(f"{float(q):.12g}")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, or ToolError."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("expression must be a non-empty string")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        text = expression.strip()
        at = (e.offset or 0) - 1
        hint = f": unexpected {text[at]!r} at position {at}" if 0 <= at < len(text) else ""
        raise ToolError(f"invalid expression {expression!r}{hint}") from None
    return format_number(_eval(tree))


def find_entity(entity: str) -> str | None:
    key = entity.strip().removeprefix("HTTP ").removeprefix("http ").strip()
    return next((k for k in TABLE if k.lower() == key.lower()), None)


def lookup(entity: str, field: str) -> dict:
    name = find_entity(entity) if isinstance(entity, str) else None
    if name is None:
        close = difflib.get_close_matches(str(entity), list(TABLE), n=3, cutoff=0.6)
        raise ToolError(f"unknown entity {entity!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if field not in TABLE[name]:
        raise ToolError(f"no field {field!r} for {name}; available: {', '.join(TABLE[name])}")
    return {"entity": name, "field": field, "value": TABLE[name][field]}


def run_tool(name: str, arguments: dict, python: Callable[[str], str] | None = None) -> str:
    """The tool's reply (a JSON string) to a call. `python(code) -> stdout` runs the python tool; without
    one that tool answers with an error (model-written code must only ever run in a sandbox)."""
    try:
        if name == "calculator":
            return json.dumps({"result": calculate(arguments.get("expression"))})
        if name == "lookup":
            return json.dumps(lookup(arguments.get("entity"), arguments.get("field")), ensure_ascii=False)
        if name == "python":
            if python is None:
                raise ToolError("the python tool is not available here")
            return json.dumps({"stdout": python(str(arguments.get("code", "")))})
        raise ToolError(f"unknown tool {name!r}")
    except ToolError as e:
        return json.dumps({"error": str(e)})
