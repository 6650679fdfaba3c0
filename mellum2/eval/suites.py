"""The post-training suites as evaluations: `chat` (held-out chat prompts: format rate, tool-call
accuracy, identity, the Thinking format) and `rl` (mean verifiable reward on the fixed held-out RL
tasks, with a bootstrap interval).

Both call the post-training code that owns them: `mellum2.posttrain.chateval.evaluate` and
`mellum2.posttrain.rollout.evaluate` over `rltasks.rl_tasks("heldout", ...)`. Where that code is not
installed yet the result is {"available": False, "reason": ...} (and the CLI says "not available"),
so the evaluation suite and the speedrun run today and pick the suites up once they exist.
"""
from __future__ import annotations

import importlib


def _find(module: str, attr: str):
    """module.attr, or None when the module or the attribute is missing (not yet merged)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise
    return getattr(mod, attr, None)


def not_available(what: str) -> dict:
    return {"available": False, "reason": f"{what} is not in this installation yet"}


def chat(model, tok, think: bool = False, n: int | None = None, max_new_tokens: int | None = None) -> dict:
    """Held-out chat checks of an Instruct (think=False) or Thinking (think=True) checkpoint."""
    evaluate = _find("mellum2.posttrain.chateval", "evaluate")
    if evaluate is None:
        return not_available("the chat evaluator (mellum2.posttrain.chateval.evaluate)")
    res = evaluate(model, tok, think=think, n=n, max_new_tokens=max_new_tokens)
    return {"available": True, **res}


def rl(model, tok, n: int = 200, kinds=None, max_new_tokens: int = 256, thinking: bool = False) -> dict:
    """Mean verifiable reward (greedy) on the fixed held-out RL tasks."""
    evaluate = _find("mellum2.posttrain.rollout", "evaluate")
    rl_tasks = _find("mellum2.posttrain.rltasks", "rl_tasks")
    if evaluate is None or rl_tasks is None:
        return not_available("the RL held-out evaluation (mellum2.posttrain.rollout.evaluate)")
    from mellum2.infer.engine import Engine  # only when the suite exists

    tasks = rl_tasks("heldout", kinds, n=n, seed=0)
    res = evaluate(Engine(model), tok, tasks, max_new_tokens=max_new_tokens, thinking=thinking)
    summary = res.summary() if hasattr(res, "summary") else dict(res)
    return {"available": True, **summary}
