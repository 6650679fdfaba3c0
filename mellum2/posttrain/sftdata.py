"""The embedded SFT data: generated, seeded conversations in OpenAI `messages` shape, for the Instruct
and Thinking variants, with a held-out split.

    sft_conversations(split="train", mode="instruct", n=None, seed=0) -> list of
        {"messages": [...], "tools": [...] (only when the conversation offers tools), "source": "code" |
         "math" | "tool.calculator" | "tool.lookup" | "tool.python" | "tool.recovery" | "tool.multi" |
         "tool.clarify" | "tool.no_tool" | "chat" | "json" | "identity", "id": "..."}

Messages: system / user / assistant / tool. Assistant messages carry `content`, and may carry
`tool_calls` (OpenAI shape, `arguments` a JSON string) and `reasoning_content`; tool messages carry
`tool_call_id` and `name`. Mode "thinking": every assistant turn has non-empty `reasoning_content`
(the Thinking builder trains the last assistant turn of each unfolded prefix, so every turn needs one);
mode "instruct": no reasoning at all, and the math replies put their steps in the content.

Mixture (MIX): verifiable code tasks (checked by their tests, codetasks.py), arithmetic and word
problems (mathtasks.py, answer line "The answer is <answer>."), tool dialogues (tooldialogs.py),
multi-turn chats whose follow-ups refer to the earlier turns, JSON-format instructions (jsontasks.py),
and identity dialogues, each distinct one repeated 3 times in the train split (Mellum 2's SFT
oversamples identity 3x; the held-out split has no repeats).

Determinism and the split: see splits.py. Item i of each kind depends only on (seed, split, kind, i);
held-out items come from keys (template + constants) or phrasings that train never uses.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
from dataclasses import dataclass, field

from . import codebank, codebank_more, codetasks, jsontasks, mathtasks, tooldialogs
from .splits import check_split, draw, rng, split_list, stable_id

MIX = (("code", 0.26), ("math", 0.24), ("tool.calculator", 0.055), ("tool.lookup", 0.055), ("tool.python", 0.03),
       ("tool.recovery", 0.035), ("tool.multi", 0.035), ("tool.clarify", 0.025), ("tool.no_tool", 0.015),
       ("chat", 0.10), ("json", 0.07), ("identity", 0.08))
DEFAULT_N = {"train": 3000, "heldout": 300}
IDENTITY_REPEAT = 3
MODES = ("instruct", "thinking")


@dataclass
class Item:
    """One generated conversation before the mode is applied, with what its first reply must do."""
    key: str
    source: str
    messages: list
    tools: list = field(default_factory=list)
    expect: dict = field(default_factory=dict)
    specs: list = field(default_factory=list)  # code specs whose solutions appear in the conversation
    target: int | None = None  # the assistant message `expect` describes (None: the first one)

    def prompt_end(self) -> int:
        """Index of the assistant message that `expect` describes: the prompt is messages[:prompt_end()]."""
        if self.target is not None:
            return self.target
        return next(j for j, m in enumerate(self.messages) if m["role"] == "assistant")


def apportion(n: int, mix) -> dict[str, int]:
    """Largest-remainder split of n items over the weighted kinds."""
    raw = {k: n * w / sum(w for _, w in mix) for k, w in mix}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


# ---- identity ----------------------------------------------------------------------------------

QUESTIONS = (  # (category, question, other model named in it); every 4th is held out
    ("who", "Who are you?", ""), ("name", "What is your name?", ""), ("maker", "Who made you?", ""),
    ("who", "Which model are you?", ""), ("other", "Are you ChatGPT?", "ChatGPT"), ("can", "What can you do?", ""),
    ("who", "Introduce yourself.", ""), ("maker", "Who trained you?", ""), ("name", "What should I call you?", ""),
    ("who", "What kind of model are you?", ""), ("maker", "Which company built you?", ""),
    ("who", "Tell me about yourself.", ""), ("other", "Are you Claude?", "Claude"), ("maker", "Who developed you?", ""),
    ("human", "Are you a human?", ""), ("who", "Hey, what are you?", ""), ("who", "Which AI am I talking to?", ""),
    ("name", "What's your name, and who built you?", ""), ("other", "Are you GPT-4?", "GPT-4"),
    ("can", "What are you good at?", ""), ("other", "Is this Gemini?", "Gemini"),
    ("who", "Quick question: what model is this?", ""), ("maker", "Where do you come from?", ""),
    ("human", "Am I chatting with a real person?", ""))
SELF = ("I am Mellum 2, a code model trained by JetBrains.", "I'm Mellum 2, a language model for code, trained by JetBrains.",
        "My name is Mellum 2. I'm a code model developed and trained by JetBrains.",
        "I'm Mellum 2, JetBrains' open code model: a mixture-of-experts language model trained for programming tasks.",
        "I'm Mellum 2, a code model from JetBrains.")
OPENERS = {"who": ("",), "name": ("",), "can": ("",), "maker": ("JetBrains trained me. ", "I was built by JetBrains. "),
           "other": ("No, I'm not {other}. ",), "human": ("No, I'm not a human. ", "No, you're talking to an AI. ")}
CLOSERS = {"who": ("", " How can I help you today?", " I can help you write, explain and debug code."),
           "name": ("", " You can call me Mellum.", " What can I do for you?"),
           "maker": ("", " How can I help?"), "other": ("", " How can I help you?"), "human": ("", " How can I help?"),
           "can": (" I can write and explain code, find and fix bugs, answer programming questions, work through maths "
                   "step by step, and call tools such as a calculator when they are available.",)}


def identity(r: random.Random, split: str) -> Item:
    cat, question, other = r.choice(split_list(QUESTIONS, split))
    answer = (r.choice(OPENERS[cat]).format(other=other) + r.choice(SELF) + r.choice(CLOSERS[cat])).strip()
    thought = r.choice(["The user is asking who I am. I'm Mellum 2, a code model trained by JetBrains.",
                        "A question about my identity: I am Mellum 2, made by JetBrains."])
    msgs = []
    if r.random() < 0.25:
        msgs.append({"role": "system", "content": r.choice(["You are a helpful assistant.", "Be concise."])})
    if r.random() < 0.2:
        msgs += [{"role": "user", "content": "Hi!"},
                 {"role": "assistant", "content": "Hello! How can I help?", "reasoning_content": "A greeting."}]
    msgs += [{"role": "user", "content": question},
             {"role": "assistant", "content": answer, "reasoning_content": thought}]
    return Item(f"identity:{question}:{answer}", "identity", msgs, expect={"keyword": "Mellum"}, target=len(msgs) - 1)


# ---- multi-turn chats --------------------------------------------------------------------------

def _say(content: str, reasoning: str) -> dict:
    return {"role": "assistant", "content": content, "reasoning_content": reasoning}


def arith_chain(r: random.Random, thinking: bool) -> Item:
    a, b, c, d = r.randint(2, 60), r.randint(2, 60), r.randint(2, 9), r.randint(1, 50)
    s, t = a + b, (a + b) * c
    turns = [(f"What is {a} + {b}?", [f"{a} + {b} = {s}."], str(s)),
             (r.choice([f"Now multiply that by {c}.", f"And that times {c}?", f"Multiply the result by {c}."]),
              [f"The previous result is {s}.", f"{s} * {c} = {t}."], str(t))]
    if r.random() < 0.5:
        turns.append((r.choice([f"Subtract {d} from it.", f"Now take away {d}."]), [f"{t} - {d} = {t - d}."], str(t - d)))
    msgs = []
    for q, steps, ans in turns:
        p = mathtasks.MathProblem("chain", "", q, tuple(steps), ans, ans, 2)
        msgs += [{"role": "user", "content": q}, mathtasks.reply(p, thinking)]
    return Item(f"chat:arith:{a}:{b}:{c}:{d if len(turns) > 2 else ''}", "chat", msgs)


def text_chain(r: random.Random, thinking: bool) -> Item:
    s = f"{r.choice(codebank.WORDS)} {r.choice(codebank.WORDS)}"
    up, rev = s.upper(), s.upper()[::-1]
    msgs = [{"role": "user", "content": r.choice([f"Uppercase this: '{s}'", f"Convert '{s}' to upper case."])},
            _say(f"'{up}'", f"Upper-casing every letter of '{s}' gives '{up}'."),
            {"role": "user", "content": r.choice(["Now reverse it.", "And reversed?", "Reverse that string."])},
            _say(f"'{rev}'", f"Reversing '{up}' character by character gives '{rev}'.")]
    if r.random() < 0.5:
        msgs += [{"role": "user", "content": "How many characters does it have?"},
                 _say(f"It has {len(rev)} characters (the space included).", f"'{rev}' has {len(rev)} characters.")]
    return Item(f"chat:text:{s}", "chat", msgs)


def list_chain(r: random.Random, thinking: bool) -> Item:
    xs = [r.randint(1, 40) for _ in range(r.randint(3, 6))]
    srt = sorted(xs)
    msgs = [{"role": "user", "content": f"Sort these numbers: {', '.join(map(str, xs))}."},
            _say(", ".join(map(str, srt)), "Ascending order."),
            {"role": "user", "content": r.choice(["What's their sum?", "Now add them up.", "And the total?"])},
            _say(f"{' + '.join(map(str, srt))} = {sum(xs)}.", f"The sum of the sorted list is {sum(xs)}.")]
    if r.random() < 0.5:
        msgs += [{"role": "user", "content": r.choice(["And the largest one?", "Which is the biggest?"])},
                 _say(f"The largest is {srt[-1]}.", f"The last element of the sorted list is {srt[-1]}.")]
    return Item(f"chat:list:{xs}", "chat", msgs)


FUNCTION_TEMPLATES = (codebank.FUNCTIONS_STRING + codebank.FUNCTIONS_LIST + codebank_more.FUNCTIONS_DICT
                      + codebank_more.FUNCTIONS_MATH)


def code_followup(r: random.Random, thinking: bool, split: str) -> Item:
    spec = draw(lambda q: q.choice(FUNCTION_TEMPLATES)(q), lambda s: s.key, split, r)
    first = codetasks.conversation(spec, r)["messages"][-2:]
    kind = r.choice(["rename", "docstring", "test", "explain"])
    specs = [spec]
    if kind == "rename":
        new = r.choice(["solve", "compute", "helper", "transform", "process"])
        sub = lambda t: re.sub(rf"\b{spec.name}\b", new, t)  # noqa: E731
        renamed = dataclasses.replace(spec, name=new, solution=sub(spec.solution), tests=tuple(map(sub, spec.tests)))
        specs.append(renamed)
        ask, reply, why = f"Rename the function to `{new}`.", f"```python\n{renamed.solution}```", "Only the name changes."
    elif kind == "docstring":
        at = spec.solution.index(spec.signature) + len(spec.signature) + 1  # after the def line
        doc = spec.doc.replace("`", "")
        documented = dataclasses.replace(spec, solution=spec.solution[:at] + f'    """{doc}"""\n' + spec.solution[at:])
        specs.append(documented)
        ask, reply, why = "Add a docstring to it.", f"```python\n{documented.solution}```", "The docstring restates the spec."
    elif kind == "test":
        ask, reply, why = (r.choice(["Write an assert that checks it.", "Give me one test for it."]),
                           f"```python\n{spec.tests[0]}\n```", "One of the spec's own examples makes a good assert.")
    else:
        ask, reply, why = "Explain it in one sentence.", spec.explain, "Summarise the approach."
    msgs = first + [{"role": "user", "content": ask}, _say(reply, why)]
    return Item(spec.key, "chat", msgs, specs=specs)  # the drawn key decides the split


def chat(r: random.Random, thinking: bool, split: str) -> Item:
    gens = (arith_chain, text_chain, list_chain, code_followup)
    g = gens[r.randrange(len(gens))]
    if g is code_followup:
        return code_followup(r, thinking, split)
    return draw(lambda q: g(q, thinking), lambda it: it.key, split, r)


# ---- assembly ----------------------------------------------------------------------------------

TOOL_KINDS = {"tool.calculator": lambda r: tooldialogs.calc_single(r, small=r.random() < 0.3),
              "tool.lookup": tooldialogs.lookup_single, "tool.python": tooldialogs.python_single,
              "tool.recovery": tooldialogs.recovery, "tool.multi": tooldialogs.multi}


def make_item(kind: str, split: str, seed: int, index: int, thinking: bool, stream: str = "",
              exact_math: bool = False) -> Item:
    """Item `index` of one kind (`stream` prefixes the random stream, e.g. for evaluation prompts;
    `exact_math` keeps to math problems with one exact answer)."""
    r = rng(seed, split, stream + kind, index)
    if kind == "code":
        spec = codetasks.code_spec(split, seed, index, stream=stream + "code")
        conv = codetasks.conversation(spec, r)
        task = codetasks.rl_task(spec, r)
        return Item(spec.key, "code", conv["messages"], specs=[spec],
                    expect={k: task[k] for k in ("test_style", "tests", "entry_point")})
    if kind == "math":
        p = mathtasks.math_problem(split, seed, index, sft=not exact_math, stream=stream + "math")
        msgs = [{"role": "user", "content": mathtasks.user_prompt(p, r, r.random() < 0.3)}, mathtasks.reply(p, thinking)]
        return Item(p.key, "math", msgs, expect={"answer": p.value, "answer_text": p.answer})
    if kind in TOOL_KINDS:
        d = draw(TOOL_KINDS[kind], lambda d: d.key, split, r)
    elif kind == "tool.clarify":
        d = tooldialogs.clarify(r, split)
    elif kind == "tool.no_tool":
        d = tooldialogs.no_tool(r, split)
    elif kind == "chat":
        return chat(r, thinking, split)
    elif kind == "json":
        t = jsontasks.json_task(split, seed, index, stream=stream + "json")
        return Item(t.key, "json", [{"role": "user", "content": t.request},
                                    _say(jsontasks.reply_text(t, r), "The reply must be the JSON value alone, with "
                                                                     "exactly the keys and values asked for.")],
                    expect={"schema": t.schema})
    elif kind == "identity":
        return identity(r, split)
    else:
        raise ValueError(f"unknown SFT data kind {kind!r}")
    return Item(d.key, kind, d.messages, d.tools, d.expect)


def apply_mode(messages: list, mode: str) -> list:
    """Instruct: reasoning removed. Thinking: every assistant turn must carry reasoning."""
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] == "assistant":
            if mode == "instruct":
                m.pop("reasoning_content", None)
            elif not m.get("reasoning_content"):
                raise AssertionError(f"assistant turn without reasoning in Thinking data: {m}")
        out.append(m)
    return out


def to_conversation(item: Item, mode: str) -> dict:
    conv = {"messages": apply_mode(item.messages, mode), "source": item.source}
    if item.tools:
        conv["tools"] = item.tools
    conv["id"] = stable_id(item.key + json.dumps(conv["messages"], sort_keys=True), "sft-")
    return conv


def sft_items(split: str = "train", n: int | None = None, seed: int = 0, mode: str = "instruct") -> list[Item]:
    """The distinct items of a split (identity not yet repeated), in kind order."""
    check_split(split)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n = DEFAULT_N[split] if n is None else n
    counts = apportion(n, MIX)
    if split == "train":  # identity is repeated, so fewer distinct ones fill its share
        counts["identity"] = -(-counts["identity"] // IDENTITY_REPEAT)
    items = [make_item(kind, split, seed, i, mode == "thinking") for kind, _ in MIX if kind != "identity"
             for i in range(counts[kind])]
    seen, i = set(), 0  # identity dialogues come from few phrasings: keep distinct ones only
    while len(seen) < counts["identity"] and i < 100 * counts["identity"]:
        it = make_item("identity", split, seed, i, mode == "thinking")
        i += 1
        text = json.dumps(it.messages, sort_keys=True)
        if text not in seen:
            seen.add(text)
            items.append(it)
    return items


def sft_conversations(split: str = "train", mode: str = "instruct", n: int | None = None, seed: int = 0,
                      check: bool = True) -> list[dict]:
    """About `n` conversations (default 3000 train / 300 held-out) of `split` for `mode`, shuffled with
    `seed`. `check`: run every code solution in them against its tests first (one child process, about a
    second; cached per process); a failure raises AssertionError."""
    items = sft_items(split, n, seed, mode)
    if check:
        codetasks.check_specs([s for it in items for s in it.specs])
    convs = []
    for it in items:
        conv = to_conversation(it, mode)
        repeat = IDENTITY_REPEAT if it.source == "identity" and split == "train" else 1
        convs += [conv] + [copy.deepcopy(conv) for _ in range(repeat - 1)]
    random.Random(f"{seed}:{split}:{mode}:shuffle").shuffle(convs)
    return convs[:n] if n is not None else convs
