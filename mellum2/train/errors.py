"""Errors the trainer raises for bad input or a run that cannot go on; the CLI prints them without a
traceback. Each message names the file, flag or field that is wrong and what was expected."""
from mellum2.errors import MellumError


class TrainError(MellumError, RuntimeError):
    """Bad arguments, data or resume state (nothing was written or overwritten)."""


class TrainingDiverged(TrainError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""
