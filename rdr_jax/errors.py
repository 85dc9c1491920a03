"""Errors every layer raises for bad input, so that a low layer (data, retrieval) can name a config key without
importing the training engine. The command line turns them into one-line messages with exit code 2."""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A config problem; the message names the key (and the file when there is one)."""


class FormatError(ValueError):
    """A malformed input row; the message starts with `FILE:LINE:`."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
        super().__init__(f"{where}: {message}")
        self.path = os.fspath(path)
        self.line = line
