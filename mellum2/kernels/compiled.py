"""A function compiled on first use, or its eager self where compiling fails.

The CPU training kernels written in plain torch (the attention backward, the LM head's loss) are
chains of fp32 element-wise passes over large blocks; inductor fuses them into one or two passes.
They are compiled for the shapes they see (`dynamic=False`: one compile per shape, cached on disk
by inductor) even when the model itself is not (`mellum2 train` without `--compile`). Where
compiling fails (no C++ compiler, an inductor bug) the eager function runs from then on, after one
warning: it is always right, only slower. Inside a compiled caller the function is traced as is.
A function that edits its inputs in place (Muon's update, gradient clipping) is re-run eagerly only
when compiling failed (dynamo's and inductor's exceptions); an error while the compiled code ran may
have edited some inputs already, so it is raised rather than applied twice.
"""
from __future__ import annotations

import warnings

import torch


class CompiledOrEager:
    def __init__(self, fn, what: str, recompile_limit: int | None = None, in_place: bool = False):
        """recompile_limit: shapes compiled before further ones run eagerly (dynamo's default, 8,
        unless given; the limit is per function). in_place: fn edits its arguments (see above)."""
        self.fn, self.what, self.recompile_limit, self.in_place = fn, what, recompile_limit, in_place
        self.compiled = None  # None: not yet compiled; False: compiling failed, eager from now on

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=False)
        if self.compiled is not False:
            try:
                if self.recompile_limit is None:
                    return self.compiled(*args)
                with torch._dynamo.config.patch(recompile_limit=self.recompile_limit):
                    return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 (inductor raises many kinds; the eager path is always right)
                if self.in_place and not isinstance(e, torch._dynamo.exc.TorchDynamoException):
                    raise  # raised while running: inputs may be half updated, so no eager second pass
                warnings.warn(f"mellum2: compiling {self.what} failed ({type(e).__name__}: {e}); "
                              "running it eagerly", stacklevel=2)
                self.compiled = False
        return self.fn(*args)
