"""JSON-format instructions: a request whose reply must be a JSON value satisfying a JSON Schema.

Used by RL (the verifier validates the reply with `jsonschema`) and, with the reference value as the
reply, by SFT so the policy has seen the format before RL. The schema pins down everything the request
states (`const` for dictated or extracted values, types, `enum`, array lengths,
`additionalProperties: false`), so a schema-valid reply is a correct reply.

What the verifier should parse: the reply's content with surrounding whitespace and an optional
```json fence removed (`strip_fence`). Levels: 1 = one key with a dictated value; 2 = extraction of
2-3 typed fields from a sentence, or a computed list; 3 = nested objects, enums and arrays of objects.
Split key: template and constants (the dictated values), not the phrasing. Schemas declare draft 2020-12 (`$schema`).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from mellum2.data.mathgen import NAMES

from . import tools
from .splits import draw, rng

KEYS = ("color", "name", "city", "status", "language", "fruit", "animal", "label", "mode", "unit")
VALUES = ("red", "green", "blue", "Oslo", "Lima", "ready", "done", "python", "kotlin", "apple", "pear", "otter",
          "falcon", "alpha", "beta", "metric", "fast", "slow", "open", "closed")
TAGS = ("fiction", "history", "science", "poetry", "travel", "cooking", "mystery", "biography")
DRAFT = "https://json-schema.org/draft/2020-12/schema"
FENCE = re.compile(r"^```(?:json)?\s*\n(.*?)\n?```$", re.S)


@dataclass(frozen=True)
class JsonTask:
    key: str
    request: str
    schema: dict
    reference: object   # a value that satisfies the schema
    difficulty: int


def strip_fence(text: str) -> str:
    t = (text or "").strip()
    m = FENCE.match(t)
    return m.group(1).strip() if m else t


def _obj(props: dict, required: list | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props), "additionalProperties": False}


ONLY = ("Reply with only the JSON object.", "Output just the JSON, nothing else.", "Answer with JSON only.")


def one_key(r: random.Random) -> JsonTask:
    k = r.choice(KEYS)
    typ = r.choice(["string", "number", "boolean"])
    v = {"string": r.choice(VALUES), "number": r.randint(0, 99), "boolean": r.choice([True, False])}[typ]
    what = {"string": f'the string "{v}"', "number": f"the number {v}", "boolean": json.dumps(v)}[typ]
    req = r.choice([f'Reply with a JSON object with one key, "{k}", whose value is {what}.',
                    f'Give me a JSON object that maps "{k}" to {what}.',
                    f'Return JSON: an object with the single key "{k}" set to {what}.'])
    return JsonTask(f"json:one_key:{k}:{v!r}", f"{req} {r.choice(ONLY)}", _obj({k: {"const": v}}), {k: v}, 1)


def person(r: random.Random) -> JsonTask:
    name, age, (city, _) = r.choice(NAMES), r.randint(18, 90), r.choice(list(tools.COUNTRIES.values()))
    sentence = r.choice([f"{name} is {age} years old and lives in {city}.", f"Meet {name}, {age}, from {city}.",
                         f"{name} ({age}) moved to {city} last year."])
    schema = _obj({"name": {"type": "string", "const": name}, "age": {"type": "integer", "const": age},
                   "city": {"type": "string", "const": city}})
    req = (f'Extract the person from this text as a JSON object with the keys "name" (string), "age" (integer) '
           f'and "city" (string).\n\nText: {sentence}\n\n{r.choice(ONLY)}')
    return JsonTask(f"json:person:{name}:{age}:{city}", req, schema, {"name": name, "age": age, "city": city}, 2)


def number_list(r: random.Random) -> JsonTask:
    xs = [r.randint(1, 30) for _ in range(r.randint(4, 7))]
    rule, keep = r.choice([("the even numbers", lambda v: v % 2 == 0), ("the odd numbers", lambda v: v % 2 == 1),
                           ("the numbers greater than 10", lambda v: v > 10)])
    k = r.choice(["numbers", "result", "values"])
    out = [v for v in xs if keep(v)]
    schema = _obj({k: {"type": "array", "items": {"type": "integer"}, "const": out}})
    req = (f'Return a JSON object with the key "{k}" holding the list of {rule} among '
           f'{", ".join(map(str, xs))}, in the order given. {r.choice(ONLY)}')
    return JsonTask(f"json:number_list:{xs}:{rule}:{k}", req, schema, {k: out}, 2)


def fact_record(r: random.Random) -> JsonTask:
    lang = r.choice(sorted(tools.LANGUAGES))
    creator, year = tools.LANGUAGES[lang]
    schema = _obj({"language": {"type": "string", "const": lang}, "year": {"type": "integer", "const": year}})
    req = (f'{lang} first appeared in {year} (created by {creator}). Put the language and the year into a JSON '
           f'object with the keys "language" and "year" (an integer). {r.choice(ONLY)}')
    return JsonTask(f"json:fact_record:{lang}", req, schema, {"language": lang, "year": year}, 2)


def book(r: random.Random) -> JsonTask:
    title = f"The {r.choice(VALUES).title()} {r.choice(['River', 'Garden', 'Machine', 'Letter', 'Island'])}"
    author, year = r.choice(NAMES), r.randint(1850, 2024)
    tags = r.sample(TAGS, r.randint(2, 3))
    status = r.choice(["available", "borrowed", "lost"])
    schema = _obj({
        "book": _obj({"title": {"const": title}, "author": {"const": author}, "year": {"type": "integer", "const": year},
                      "tags": {"type": "array", "items": {"enum": tags}, "minItems": len(tags), "maxItems": len(tags),
                               "uniqueItems": True}}),
        "status": {"enum": ["available", "borrowed", "lost"], "const": status}})
    ref = {"book": {"title": title, "author": author, "year": year, "tags": tags}, "status": status}
    req = (f'"{title}" by {author} ({year}) is tagged {", ".join(tags)} and is currently {status}. Describe it as a '
           f'JSON object with a key "book" (an object with "title", "author", "year" as an integer, and "tags" as a '
           f'list of strings) and a key "status" (one of "available", "borrowed", "lost"). {r.choice(ONLY)}')
    return JsonTask(f"json:book:{title}:{author}:{year}:{tags}:{status}", req, schema, ref, 3)


def squares(r: random.Random) -> JsonTask:
    n, f = r.randint(2, 5), r.choice(["square", "double", "cube"])
    op = {"square": lambda i: i * i, "double": lambda i: 2 * i, "cube": lambda i: i ** 3}[f]
    rows = [{"id": i, f: op(i)} for i in range(1, n + 1)]
    schema = {"type": "array", "minItems": n, "maxItems": n, "prefixItems": [
        _obj({"id": {"const": i}, f: {"type": "integer", "const": op(i)}}) for i in range(1, n + 1)], "items": False}
    req = (f'Return a JSON array of {n} objects, one for each id from 1 to {n} in order; each object has the keys '
           f'"id" and "{f}" (the {f} of the id). Output just the JSON array, nothing else.')
    return JsonTask(f"json:squares:{n}:{f}", req, schema, rows, 3)


LEVELS = {1: (one_key,), 2: (person, number_list, fact_record), 3: (book, squares)}


def json_task(split: str, seed: int, index: int, difficulty: int | None = None, stream: str = "json") -> JsonTask:
    """Task `index` of a stream; difficulty None mixes levels 1 / 2 / 3 as 4:4:2."""
    r = rng(seed, split, stream, index)
    level = difficulty or r.choices((1, 2, 3), weights=(4, 4, 2))[0]
    task = draw(lambda q: q.choice(LEVELS[level])(q), lambda t: t.key, split, r)
    return JsonTask(task.key, task.request, {"$schema": DRAFT, **task.schema}, task.reference, task.difficulty)


def reply_text(task: JsonTask, r: random.Random) -> str:
    """The reference as an assistant would write it (compact, indented, or fenced)."""
    style = r.random()
    if style < 0.5:
        return json.dumps(task.reference, ensure_ascii=False)
    text = json.dumps(task.reference, ensure_ascii=False, indent=2)
    return text if style < 0.8 else f"```json\n{text}\n```"
