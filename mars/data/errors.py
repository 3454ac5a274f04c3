"""The one exception type the data module raises for bad data or files."""
from __future__ import annotations

import os


class DataFormatError(ValueError):
    """Data, or a file holding data, is missing, unreadable or malformed.

    ``path`` is the offending file (or ``None`` for in-memory data); the
    message always says what was expected.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)
