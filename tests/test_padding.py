"""The one padding helper (`lumina_hf.padding`) behind the processor, the training collator and generation, against a
plain per-row reference, and each caller's output against the helper."""

from __future__ import annotations

import random

import pytest
import torch

from lumina_hf.padding import left_pad_prompts, pad_batch
from lumina_hf.training.collator import LuminaMGPTDataCollator

PAD = 1


def reference(seqs, side, labels=None, multiple=None, mask_length=None):
    n = max(len(s) for s in seqs)
    if multiple:
        n = -(-n // multiple) * multiple
    total = mask_length or n
    ids, mask, lab, pos = [], [], [], []
    for i, s in enumerate(seqs):
        fill = n - len(s)
        if side == "left":
            ids.append([PAD] * fill + list(s))
            mask.append([0] * fill + [1] * len(s) + [1] * (total - n))
            pos.append([0] * fill + list(range(len(s))))
            if labels is not None:
                lab.append([-100] * fill + list(labels[i]))
        else:
            ids.append(list(s) + [PAD] * fill)
            mask.append([1] * len(s) + [0] * fill + [1] * (total - n))
            pos.append(list(range(len(s))) + [len(s) - 1] * fill)
            if labels is not None:
                lab.append(list(labels[i]) + [-100] * fill)
    return ids, mask, lab, pos


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("multiple", [None, 8])
def test_pad_batch_matches_a_plain_loop(side, multiple):
    rng = random.Random(0)
    seqs = [[rng.randrange(3, 100) for _ in range(rng.randrange(1, 13))] for _ in range(5)]
    labels = [[t if rng.random() < 0.5 else -100 for t in s] for s in seqs]
    out = pad_batch(seqs, PAD, side=side, labels=labels, pad_to_multiple_of=multiple, return_position_ids=True)
    ids, mask, lab, pos = reference(seqs, side, labels, multiple)
    assert out["input_ids"].tolist() == ids and out["attention_mask"].tolist() == mask
    assert out["labels"].tolist() == lab
    assert out["position_ids"].tolist() == pos  # real tokens count from 0; right padding repeats the last position
    assert {t.dtype for t in out.values()} == {torch.long}


def old_left_pad(contexts, pad_id, total, device):
    """generation_lumina_mgpt's former `_left_pad`, kept here as the reference of the shared helper."""
    n = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), n), pad_id, dtype=torch.long)
    mask = torch.ones((len(contexts), total), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, n - len(c) :] = torch.tensor(c, dtype=torch.long)
        mask[i, : n - len(c)] = 0
    pos = (mask[:, :n].cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def test_generation_prompts_pad_as_before():
    from lumina_hf import generation_lumina_mgpt

    assert generation_lumina_mgpt._left_pad is left_pad_prompts
    contexts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    for total in (5, 9):
        for a, b in zip(left_pad_prompts(contexts, PAD, total, "cpu"), old_left_pad(contexts, PAD, total, "cpu")):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mask_length"):
        left_pad_prompts(contexts, PAD, 3, "cpu")


def test_collator_and_processor_pad_through_the_helper():
    examples = [{"input_ids": [4, 5, 6], "labels": [-100, 5, 6], "length": 3}, {"input_ids": [7], "labels": [7]}]
    col = LuminaMGPTDataCollator(pad_token_id=PAD, pad_to_multiple_of=4, return_position_ids=True)(examples)
    ref = pad_batch([e["input_ids"] for e in examples], PAD, side="right", labels=[e["labels"] for e in examples],
                    pad_to_multiple_of=4, return_position_ids=True)
    assert col.keys() == ref.keys() and all(torch.equal(col[k], ref[k]) for k in ref)
    assert col["input_ids"].tolist() == [[4, 5, 6, PAD], [7, PAD, PAD, PAD]]


def test_bad_input():
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], PAD, side="middle")
    with pytest.raises(ValueError, match="empty"):
        pad_batch([], PAD)
    with pytest.raises(ValueError, match="row 1: 2 input_ids but 1 labels"):
        pad_batch([[1], [2, 3]], PAD, labels=[[1], [2]])
