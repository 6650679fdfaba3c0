"""Import hook that makes `lm_eval --model mellum2` work: lm_eval 0.4.13 looks models up only in its
own registry (no entry points), so something must register ours in the lm_eval process.

`install()` puts a finder on sys.meta_path; when `lm_eval.api.registry` is imported, right after it
has run, the hook imports `lm_eval.models` (which registers lm_eval's own models lazily, as its
`get_model` would have) and registers "mellum2" as a lazy placeholder, "mellum2.eval.lmeval:Mellum2LM":
nothing of mellum2 or torch is imported until a run asks for `--model mellum2`.

It is started by a one-line `.pth` file in the environment's site-packages (`write_pth`, run by
`make` and by `mellum2 eval lm-eval --install-hook`), which runs this file by path, so it imports only
the standard library: every interpreter of that environment reads the .pth at start-up.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TARGET = "lm_eval.api.registry"
PTH_NAME = "mellum2_lm_eval.pth"


def register() -> None:
    import lm_eval.models  # noqa: F401 - registers lm_eval's own models, as get_model would
    from lm_eval.api.registry import model_registry

    if "mellum2" not in model_registry:
        model_registry.register("mellum2", target="mellum2.eval.lmeval:Mellum2LM")


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        sys.modules[module.__name__] = module  # lm_eval.models imports it back while we register
        register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # find the real spec (and never hook twice)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def pth_line(hook_file: str | None = None) -> str:
    path = os.path.abspath(hook_file or __file__)
    return f"import runpy; runpy.run_path({path!r}, run_name='mellum2_lm_eval_hook')\n"


def write_pth(site_dir: str) -> str:
    """Write the .pth that installs the hook at interpreter start-up into `site_dir`; returns its path."""
    path = os.path.join(site_dir, PTH_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(pth_line())
    os.replace(tmp, path)
    return path


if __name__ == "mellum2_lm_eval_hook":  # run from the .pth
    install()
