"""Typed errors. User mistakes are exceptions with a one-line message; asserts are for invariants."""

from __future__ import annotations


class KVServeError(Exception):
    """Base class of every error kvserve raises on purpose."""


class ModelLoadError(KVServeError):
    """A model file or directory cannot be loaded; the message names the path and the problem."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedModelError(ModelLoadError):
    """The file is readable but uses an architecture, tensor type or tokenizer kvserve lacks."""


class InvalidRequestError(KVServeError, ValueError):
    """A request or parameter is invalid (maps to HTTP 400)."""
