"""The two ways a push fails: bad input found before any upload, or an upload that stopped part-way."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .publish import CommitRecord


class PublishInputError(ValueError):
    """Bad input found before anything was uploaded (repo id, folder, weights, token, secrets, card)."""


class PushError(RuntimeError):
    """An upload failed part-way. `committed` lists the commits that went through (each a `CommitRecord`),
    `not_committed` the paths in the repo that were not committed."""

    def __init__(self, message: str, committed: list[CommitRecord], not_committed: list[str]):
        super().__init__(message)
        self.committed = committed
        self.not_committed = not_committed


__all__ = ["PublishInputError", "PushError"]
