"""`LuminaMGPTDataCollator`: pre-tokenized Lumina-mGPT items -> a right-padded training batch."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..padding import IGNORE_INDEX, pad_batch

logger = logging.getLogger(__name__)


@dataclass
class LuminaMGPTDataCollator:
    """Pad pre-tokenized items (`input_ids` and `labels`, as written by `lumina-hf tokenize`) on the right.

    Each example is a mapping with `input_ids` (list/tensor of ints) and `labels` (same length, -100 where nothing is
    trained); other keys (`length`, `source_index`, ...) are ignored. Returns `input_ids` `(batch, seq)` padded with
    `pad_token_id` (1 = `<pad>`), `labels` `(batch, seq)` padded with -100, and `attention_mask` `(batch, seq)` with 1
    on real tokens. `seq` is the longest item, rounded up to `pad_to_multiple_of` when set. Items are never truncated:
    an item longer than `max_length` (when set) is an error, since cutting an image span breaks the UniRep layout.
    """

    pad_token_id: int = 1
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    return_position_ids: bool = False

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples.")
        ids_list, label_list = [], []
        for i, ex in enumerate(examples):
            missing = [k for k in ("input_ids", "labels") if k not in ex]
            if missing:
                raise ValueError(
                    f"example {i} has no {' / '.join(missing)} (keys: {sorted(ex)}): the collator takes pre-tokenized "
                    "items; tokenize the data first with `lumina-hf tokenize`."
                )
            ids = torch.as_tensor(ex["input_ids"], dtype=torch.long).flatten()
            labels = torch.as_tensor(ex["labels"], dtype=torch.long).flatten()
            if ids.numel() != labels.numel():
                raise ValueError(f"example {i}: {ids.numel()} input_ids but {labels.numel()} labels.")
            if ids.numel() == 0:
                raise ValueError(f"example {i} is empty.")
            if self.max_length is not None and ids.numel() > self.max_length:
                raise ValueError(
                    f"example {i} is {ids.numel()} tokens, longer than max_length={self.max_length}; items are never "
                    "truncated (an image span cut in the middle is not a valid UniRep image)."
                )
            ids_list.append(ids)
            label_list.append(labels)

        return pad_batch(
            ids_list,
            self.pad_token_id,
            side="right",
            labels=label_list,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_position_ids=self.return_position_ids,
        )


__all__ = ["IGNORE_INDEX", "LuminaMGPTDataCollator"]
