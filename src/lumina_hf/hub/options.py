"""What the caller asks of a push (`PublishOptions`, one dataclass), checked once, before any work."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id

from .errors import PublishInputError
from .scrub import looks_local

CARD_TYPES = ("base", "finetune", "adapter")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt", ".tsv", ".tar", ".zip")


def validate_hub_repo_id(repo_id: str, what: str = "repo id") -> str:
    """`namespace/name`, checked with huggingface_hub's validator. Raises `PublishInputError`."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise PublishInputError(f"{what} {repo_id!r} must be 'namespace/name' (a user or organization, then the repo name).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishInputError(f"{what} {repo_id!r} is not a valid Hub repo id: {err}") from None
    return repo_id


def looks_like_hub_id(value: Any) -> bool:
    """A valid `namespace/name` that is not a local path, a data file name or an existing file."""
    if not isinstance(value, str) or value.count("/") != 1 or looks_local(value):
        return False
    if value.lower().endswith(_DATA_SUFFIXES) or os.path.exists(os.path.expanduser(value)):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _string_list(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise PublishInputError(f"{what} must be a list of non-empty strings, got {value!r}.")
    return list(value)


@dataclass
class PublishOptions:
    """Everything about a push that is not the folder, the repo id, the token or the upload itself.

    Card: `card_type` ("base", "finetune" or "adapter"; default from the folder), `base_model` (Hub id),
    `omni` (default: "omni" in the repo id, base model or folder name), `license` / `license_name` /
    `license_link` (default the Chameleon Research License), extra `datasets` and `tags`, `target_size` (the
    bucket family when the processor does not say). Samples: `samples` (prompts), `seed` (image i uses seed + i),
    `sample_size` ((width, height), default the target square), `device`. Files: `include`, glob patterns of
    extra files to upload besides those the folder's kind needs (matched against the path in the folder,
    `*` crossing folders: `notes/*.txt`, `extra.json`); they are scanned like every other file.
    """

    card_type: str | None = None
    base_model: str | None = None
    omni: bool | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    datasets: list[str] | None = None
    tags: list[str] | None = None
    target_size: int | None = None
    samples: list[str] | None = None
    seed: int = 0
    sample_size: tuple[int, int] | None = None
    device: str | None = None
    include: list[str] | None = None

    def __post_init__(self) -> None:
        if self.card_type is not None and self.card_type not in CARD_TYPES:
            raise PublishInputError(f"card type {self.card_type!r} is not one of {', '.join(CARD_TYPES)}.")
        if self.base_model is not None:
            validate_hub_repo_id(self.base_model, "base model")
        self.datasets = _string_list(self.datasets, "datasets")
        for d in self.datasets or []:
            validate_hub_repo_id(d, "dataset id")
        self.tags = _string_list(self.tags, "tags")
        self.samples = _string_list(self.samples, "sample prompts")
        self.include = _string_list(self.include, "include patterns")
        if self.target_size is not None and (not isinstance(self.target_size, int) or self.target_size <= 0):
            raise PublishInputError(f"target_size must be a positive integer, got {self.target_size!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise PublishInputError(f"seed must be a non-negative integer, got {self.seed!r}.")
        if self.sample_size is not None:
            size = tuple(self.sample_size)
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise PublishInputError(f"sample_size must be (width, height) in pixels, got {self.sample_size!r}.")
            self.sample_size = size

    @classmethod
    def build(cls, options: PublishOptions | None = None, **kwargs: Any) -> PublishOptions:
        """`options` as given, or built from keyword arguments (the public functions take either)."""
        if options is not None:
            if kwargs:
                raise TypeError(f"pass either options= or keyword arguments, not both (got {', '.join(sorted(kwargs))}).")
            if not isinstance(options, cls):
                raise TypeError(f"options must be a PublishOptions, got {type(options).__name__}.")
            return options
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown publishing option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**kwargs)


__all__ = ["CARD_TYPES", "PublishOptions", "looks_like_hub_id", "validate_hub_repo_id"]
