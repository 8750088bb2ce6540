"""Score a model on the synthetic shapes: text-to-image (background color, shape color, shape kind, size),
segmentation IoU, and description accuracy. Used by `benchmarks/eval_shapes.py` and the tests."""

import dataclasses
import logging

import torch

from .shapes import ASPECTS, analyze_image, aspect_size, make_item, mask_iou

logger = logging.getLogger(__name__)

EVAL_SEED = 10_000  # disjoint from the training seeds


@dataclasses.dataclass
class ShapesScore:
    n: int = 0
    background: int = 0
    color: int = 0
    shape: int = 0
    size: int = 0
    seg_n: int = 0
    seg_iou: float = 0.0
    describe_n: int = 0
    describe_exact: int = 0

    def rates(self) -> dict[str, float]:
        out = {}
        if self.n:
            out.update(
                background=self.background / self.n,
                color=self.color / self.n,
                shape=self.shape / self.n,
                size=self.size / self.n,
            )
        if self.seg_n:
            out["segmentation_iou"] = self.seg_iou / self.seg_n
        if self.describe_n:
            out["description"] = self.describe_exact / self.describe_n
        return out


def evaluate_shapes(
    pipe, n: int = 30, seed: int = EVAL_SEED, tasks=("t2i", "segmentation", "describe"), batch_size: int = 6,
    **t2i_kwargs,
) -> ShapesScore:
    """Generate for `n` held-out items per task and score them. Text-to-image prompts are batched per aspect;
    `t2i_kwargs` (guidance_scale, top_k, temperature) override the model's sampling defaults for them."""
    target = pipe.processor.image_processor.target_size
    score = ShapesScore()
    items = [make_item(i, seed=seed, target_size=target) for i in range(n)]
    if "t2i" in tasks:
        for aspect in ASPECTS:
            group = [(i, it) for i, it in enumerate(items) if it.aspect == aspect]
            w, h = aspect_size(aspect, target)
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                gens = [torch.Generator().manual_seed(seed + i) for i, _ in chunk]
                out = pipe([it.caption for _, it in chunk], height=h, width=w, generator=gens, **t2i_kwargs)
                for (_, it), img in zip(chunk, out.images):
                    a = analyze_image(img)
                    score.n += 1
                    score.background += a.background == it.background
                    score.color += a.color == it.color
                    score.shape += a.shape == it.shape
                    score.size += img.size == (w, h)
    if "segmentation" in tasks:
        for i, it in enumerate(items):
            out = pipe(image=it.image, task="segmentation", generator=torch.Generator().manual_seed(seed + i))
            pred = out.images[0]
            truth = it.mask.resize(pred.size) if pred.size != it.mask.size else it.mask
            score.seg_n += 1
            score.seg_iou += mask_iou(pred, truth)
    if "describe" in tasks:
        for i, it in enumerate(items):
            out = pipe(image=it.image, task="describe", generator=torch.Generator().manual_seed(seed + i), max_new_tokens=24)
            score.describe_n += 1
            score.describe_exact += out.text[0].strip() == it.caption
    return score


__all__ = ["ShapesScore", "evaluate_shapes", "EVAL_SEED"]
