"""Padding token sequences into a batch: the one helper behind the processor, the training collator and generation.

Lumina-mGPT pads with its pad id on the left for generation (every prompt ends at the same column, so the next token
is written at one position for the whole batch) and on the right for training (labels padded with -100). Items are
never truncated: cutting a UniRep image span leaves a sequence the model cannot read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def _as_long(seq) -> torch.Tensor:
    return torch.as_tensor(seq, dtype=torch.long).flatten()


def pad_batch(
    input_ids: Sequence[Sequence[int] | torch.Tensor],
    pad_token_id: int,
    *,
    side: str = "right",
    labels: Sequence[Sequence[int] | torch.Tensor] | None = None,
    pad_to_multiple_of: int | None = None,
    mask_length: int | None = None,
    return_position_ids: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad id sequences to the longest one.

    Args:
        input_ids: one sequence of token ids per row (lists or 1-D tensors).
        pad_token_id: the id written in the padding.
        side: "left" (generation) or "right" (training).
        labels: optional, one sequence per row of the same length as its ids; padded with -100.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        mask_length: make `attention_mask` this long (>= the padded length): the positions after the sequences are
            ones, for the tokens a generation loop will write there.
        return_position_ids: also return `position_ids`, counting real tokens only (0 on left padding).

    Returns:
        `input_ids` and `attention_mask` (1 on real tokens), and `labels` / `position_ids` when asked; `(rows, length)`
        long tensors on the CPU.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}.")
    if not len(input_ids):
        raise ValueError("nothing to pad: the batch is empty.")
    rows = [_as_long(x) for x in input_ids]
    label_rows = None
    if labels is not None:
        if len(labels) != len(rows):
            raise ValueError(f"{len(rows)} id sequences but {len(labels)} label sequences.")
        label_rows = [_as_long(x) for x in labels]
        for i, (ids, lab) in enumerate(zip(rows, label_rows)):
            if ids.numel() != lab.numel():
                raise ValueError(f"row {i}: {ids.numel()} input_ids but {lab.numel()} labels.")
    n = max(x.numel() for x in rows)
    if pad_to_multiple_of:
        m = int(pad_to_multiple_of)
        n = (n + m - 1) // m * m
    total = n if mask_length is None else int(mask_length)
    if total < n:
        raise ValueError(f"mask_length={total} is shorter than the padded sequences ({n}).")
    out_ids = torch.full((len(rows), n), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), total), dtype=torch.long)
    mask[:, n:] = 1
    out_labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long) if label_rows is not None else None
    for i, ids in enumerate(rows):
        k = ids.numel()
        cols = slice(n - k, n) if side == "left" else slice(0, k)
        out_ids[i, cols] = ids
        mask[i, cols] = 1
        if out_labels is not None:
            out_labels[i, cols] = label_rows[i]
    out = {"input_ids": out_ids, "attention_mask": mask}
    if out_labels is not None:
        out["labels"] = out_labels
    if return_position_ids:
        out["position_ids"] = (mask[:, :n].cumsum(-1) - 1).clamp(min=0)
    return out


def left_pad_prompts(contexts: list[list[int]], pad_id: int, total: int, device):
    """Generation prompts: left-padded `(R, L)` ids, a `(R, total)` attention mask (ones after the prompts, for the
    tokens to come) and position ids, on `device`."""
    batch = pad_batch(contexts, pad_id, side="left", mask_length=total, return_position_ids=True)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["position_ids"].to(device)


__all__ = ["IGNORE_INDEX", "left_pad_prompts", "pad_batch"]
