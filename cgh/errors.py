"""One base class for errors caused by the user's input (paths, configs, checkpoints, data).

The command line prints these as a single clear line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class CghError(ValueError):
    """Bad input: the message says what was wrong and, where it helps, what was expected."""


class DatasetError(CghError):
    """A dataset root, split file or annotation file is missing or malformed."""
