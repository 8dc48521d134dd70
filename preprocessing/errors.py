"""The exceptions preprocessing raises on purpose, under one base the CLI turns into a one-line message.

:class:`PreprocessingError` is the base: ``wsi-fl`` reports any of them as
``wsi-fl <command>: error: <message>`` with exit code 2, while an exception
outside it (a bug) keeps its traceback. Standard library only, so the stdlib-only
parameter module (:mod:`preprocessing.params`) can raise them.
"""

from __future__ import annotations

import os
from pathlib import Path


class PreprocessingError(Exception):
    """Base of every error preprocessing raises about its inputs (slides, options, files, encoders)."""


class InputError(PreprocessingError, ValueError):
    """A preprocessing option or input (parameters, shard, MPP table, manifests, slide list) is invalid.

    Also a ``ValueError``, which is what these checks raised before the class existed.
    """


class SlideError(PreprocessingError):
    """A slide that cannot be used; ``str(err)`` is one line naming the file and the problem.

    The one exception type of slide handling, so a batch can catch it, log one line and go on.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())  # always a single line
        super().__init__(f"{self.path.name}: {self.problem}")


class EncoderError(PreprocessingError):
    """An encoder that cannot be built or weights that cannot be used; ``str(err)`` is one line saying what to do.

    Here rather than beside the encoders so that finding weights (:mod:`preprocessing.weights`, used by
    ``wsi-fl encoders`` without torch) can raise it too.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
