"""The one exception type of slide handling, so a batch can catch it, log one line and go on."""

from __future__ import annotations

import os
from pathlib import Path


class SlideError(Exception):
    """A slide that cannot be used; ``str(err)`` is one line naming the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())  # always a single line
        super().__init__(f"{self.path.name}: {self.problem}")
