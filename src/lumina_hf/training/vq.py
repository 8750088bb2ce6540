"""Images -> VQ code token ids for offline tokenization: the image tokenizer of a model folder, batched encoding, and
filling the processor's image placeholders with the codes.

The processor lays out every image as a UniRep span of `<image>` placeholders and returns its `pixel_values`; here
the model's encoder (`encode_images(pixel_values) -> (B, H/16, W/16)` token ids) turns those pixels into codes, in
batches of images of one size, and the codes replace the placeholders in reading order (as the model's own
`fill_image_placeholders` does one image at a time).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


class VQImageEncoder(torch.nn.Module):
    """Only the image tokenizer of a Lumina-mGPT checkpoint: the VQGAN plus the code -> token-id table of its config.
    `encode_images(pixel_values (B, 3, H, W) in [-1, 1]) -> (B, H/16, W/16)` token ids, like
    `LuminaMGPTForConditionalGeneration.encode_images`."""

    def __init__(self, vqmodel: torch.nn.Module, code_to_token_id: Sequence[int]):
        super().__init__()
        self.vqmodel = vqmodel
        self.register_buffer("code_to_token_id", torch.tensor(list(code_to_token_id), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        weight = self.vqmodel.quant_conv.weight
        codes = self.vqmodel.encode_to_codes(pixel_values.to(weight.device))
        return self.code_to_token_id.to(codes.device)[codes]


def _safetensors_files(folder: str) -> list[str] | None:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    return [single] if os.path.isfile(single) else None


def load_vq_model(path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load the image tokenizer of a lumina_hf model folder.

    Reads only the VQGAN tensors (`*vqmodel.*`) from the folder's safetensors into a `VQImageEncoder` (a 7B
    checkpoint's language model is never loaded); folders without safetensors fall back to
    `LuminaMGPTForConditionalGeneration.from_pretrained`. Raises a ValueError when the folder has no VQGAN weights."""
    from safetensors import safe_open

    from ..configuration_lumina_mgpt import LuminaMGPTConfig
    from ..modeling_vqgan import LuminaMGPTVQGAN

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ValueError(f"model folder {folder!r} does not exist (give a lumina_hf model folder or pass the model object).")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder!r} is not a model folder (no config.json): give a lumina_hf model folder.")
    try:
        config = LuminaMGPTConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read a Lumina-mGPT config from {folder!r}: {err}") from err
    files = _safetensors_files(folder)
    if files is None:
        from ..modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration

        logger.info("%s has no safetensors: loading the whole model to use its VQGAN.", folder)
        try:
            model = LuminaMGPTForConditionalGeneration.from_pretrained(folder)
        except OSError as err:
            raise ValueError(f"could not load a Lumina-mGPT model from {folder!r}: {err}") from err
        model.vqmodel._require("encoder")
        return model.eval() if device is None else model.to(device).eval()
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if "vqmodel." in key:
                    state[key.split("vqmodel.", 1)[1]] = f.get_tensor(key)
    # float32 from construction: a config that records `dtype: bfloat16` would otherwise round the stored fp32
    # encoder weights to bf16 on loading
    vqmodel = LuminaMGPTVQGAN._from_config(config.vq_config, dtype=torch.float32)
    expected = set(vqmodel.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(
            f"{folder} has no complete VQGAN ({len(missing)} of {len(expected)} tensors missing, e.g. {missing[0]}): "
            "the published Lumina-mGPT checkpoints do not contain it. Convert with `lumina-hf convert --checkpoint ... "
            "--vqgan <Meta Chameleon tokenizer dir>` so the folder holds the full image tokenizer."
        )
    vqmodel.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items() if k in expected}, strict=True)
    encoder = VQImageEncoder(vqmodel, config.image_code_to_token_id()).eval()
    return encoder if device is None else encoder.to(device)


def vq_module(vq_model: Any) -> torch.nn.Module | None:
    """The VQGAN inside `vq_model` (a model or a `VQImageEncoder`: its `vqmodel`), or `vq_model` itself when it is
    a module without one; None for other encoders."""
    inner = getattr(vq_model, "vqmodel", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    return vq_model if isinstance(vq_model, torch.nn.Module) else None


def encode_batches(vq_model: Any, pixels: Sequence[torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
    """VQ-encode `(3, H, W)` images in batches of one size (`batch_size` images per forward) -> one `(H/16, W/16)`
    grid of code token ids per image, in the input order, on the CPU."""
    out: list[torch.Tensor | None] = [None] * len(pixels)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixels):
        by_size.setdefault(tuple(p.shape), []).append(i)
    with torch.inference_mode():
        for idx in by_size.values():
            for s in range(0, len(idx), batch_size):
                part = idx[s : s + batch_size]
                ids = vq_model.encode_images(torch.stack([pixels[i] for i in part])).cpu()
                for j, i in enumerate(part):
                    out[i] = ids[j]
    return out  # type: ignore[return-value]


def fill_placeholders(ids, labels, grids: Sequence[torch.Tensor], placeholder_id: int):
    """Write the code token ids of `grids` (images in reading order, each row by row) over the placeholder ids of
    `ids` (one item, or a padded batch in row-major order); `labels` carry placeholders exactly where trained images
    are and get the same codes. Returns `(ids, labels)` as long tensors (labels None when not given)."""
    ids = torch.as_tensor(ids, dtype=torch.long).clone()
    mask = ids == placeholder_id
    flat = torch.cat([g.flatten() for g in grids]) if len(grids) else torch.zeros(0, dtype=torch.long)
    if int(mask.sum()) != flat.numel():
        raise ValueError(f"{int(mask.sum())} image placeholders but {flat.numel()} image codes.")
    ids[mask] = flat.to(torch.long)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        labels = torch.where(labels == placeholder_id, ids, labels)
    return ids, labels


def tokenize_with_image_codes(processor, vq_model, text=None, images=None, *, conversations=None, batch_size: int = 8, **kwargs):
    """`processor(...)` with final ids: the images are VQ-encoded by `vq_model` (batched by size) and their codes
    written over the placeholders of `input_ids` (and `labels`). Returns the processor's `BatchFeature` without
    `pixel_values`; keywords as for the processor."""
    from transformers.feature_extraction_utils import BatchFeature

    return_tensors = kwargs.pop("return_tensors", "pt")
    out = processor(text=text, images=images, conversations=conversations, **kwargs)
    data = {k: v for k, v in out.items() if k != "pixel_values"}
    pixels = out.get("pixel_values")
    if pixels:
        grids = encode_batches(vq_model, pixels, batch_size)
        data["input_ids"], labels = fill_placeholders(
            data["input_ids"], data.get("labels"), grids, processor.image_placeholder_token_id
        )
        if labels is not None:
            data["labels"] = labels
    if return_tensors is None:
        data = {k: v.tolist() for k, v in data.items()}
    return BatchFeature(data)


def encode_image_spans(processor, images, vq_model, random_crop: bool | None = None, seed: int | None = None, batch_size: int = 8) -> list[list[int]]:
    """Preprocess `images` with the processor's image processor, VQ-encode them with `vq_model` (batched by size) and
    return one full UniRep id span per image."""
    feats = processor.image_processor(images, random_crop=random_crop, seed=seed)
    pixels = processor._pixel_list(feats["pixel_values"])
    return [processor.unirep_ids(g) for g in encode_batches(vq_model, pixels, batch_size)]


__all__ = [
    "VQImageEncoder",
    "encode_batches",
    "encode_image_spans",
    "fill_placeholders",
    "load_vq_model",
    "tokenize_with_image_codes",
    "vq_module",
]
