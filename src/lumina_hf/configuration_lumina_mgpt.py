"""Configuration classes for Lumina-mGPT.

`LuminaMGPTConfig` extends transformers' `ChameleonConfig` with the fields the Lumina-mGPT fork adds
(residual dropout, optional image-logit masking, z-loss, grouped q/k-norm) and with the UniRep token ids
as configuration values, so no id is hard-coded in the modelling, processing or generation code.

It also reads the published Alpha-VLLM `config.json` (``model_type: "chameleon"``, architecture
``ChameleonXLLMXForConditionalGeneration``, a taming-style ``vq_config``) without changes.
"""

from __future__ import annotations

import logging
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import ChameleonConfig
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

from .unirep import UniRepLayout, image_code_table, image_code_token_name

logger = logging.getLogger(__name__)

# taming-transformers key -> transformers ChameleonVQVAEConfig key
_TAMING_VQ_KEYS = {
    "n_embed": "num_embeddings",
    "z_channels": "latent_channels",
    "ch": "base_channels",
    "ch_mult": "channel_multiplier",
    "double_z": "double_latent",
    "in_channels": "in_channels",
    "out_ch": "out_channels",
}


def taming_to_vq_config_dict(vq: dict[str, Any]) -> dict[str, Any]:
    """Translate a taming-transformers style VQGAN config (Meta's `vqgan.yaml` `ddconfig` plus
    `embed_dim`/`n_embed`, or the fork's `vq_config`) into `LuminaMGPTVQConfig` keyword arguments."""
    out: dict[str, Any] = {}
    for key, value in vq.items():
        if key in ("target", "params", "lossconfig", "ddconfig"):
            continue
        out[_TAMING_VQ_KEYS.get(key, key)] = value
    for nested in ("params", "ddconfig"):
        if isinstance(vq.get(nested), dict):
            out.update(taming_to_vq_config_dict(vq[nested]))
    if "channel_multiplier" in out:
        out["channel_multiplier"] = list(out["channel_multiplier"])
    if "attn_resolutions" in out and out["attn_resolutions"] is not None:
        out["attn_resolutions"] = list(out["attn_resolutions"])
    return out


@strict
class LuminaMGPTVQConfig(ChameleonVQVAEConfig):
    r"""
    The Chameleon VQGAN (taming-transformers `VQModel` layout) with the decoder that transformers' stock
    Chameleon lacks. Fields follow `ChameleonVQVAEConfig`; `beta` is the commitment weight and
    `out_channels` the decoder's output channels. The downsampling factor is `2 ** (len(channel_multiplier) - 1)`
    (16 for the published VQGAN).
    """

    model_type = "lumina_mgpt_vqgan"
    base_config_key = "vq_config"

    beta: float = 0.25
    out_channels: int = 3

    def __post_init__(self, **kwargs):
        # Accept taming-style keys as well (`n_embed`, `z_channels`, `ch`, `ch_mult`, `double_z`, `out_ch`).
        for old, new in _TAMING_VQ_KEYS.items():
            if old in kwargs and old != new:
                setattr(self, new, kwargs.pop(old))
        if self.attn_resolutions is not None:
            self.attn_resolutions = list(self.attn_resolutions)
        self.channel_multiplier = list(self.channel_multiplier)
        super().__post_init__(**kwargs)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)


@strict
class LuminaMGPTConfig(ChameleonConfig):
    r"""
    Configuration of a Lumina-mGPT model: a Chameleon decoder plus UniRep image tokens.

    Extra fields on top of `ChameleonConfig`:
        dropout (`float`): residual dropout on the attention and MLP outputs (training only; 0.05 for 7B).
        mask_image_logits (`bool`): set the logits of all image-code tokens to the dtype minimum, as stock
            Chameleon always does. False for Lumina-mGPT (it generates images).
        z_loss_weight (`float`): weight of `mean(logsumexp(logits)^2)` added to the loss in `forward`
            when labels are given (1e-5 in the published training recipe, 0 disables it).
        qk_norm_layout (`str`): "grouped" stores q/k-norm weight and bias as `[model_parallel_size, head_dim]`
            (the published checkpoints), expanded to the heads at run time; "per_head" stores
            `[num_heads, head_dim]` like stock transformers.
        bos/pad/eos ids: 0 / 1 / 8710 (`<reserved08706>` ends a turn and stops generation; `</s>`=2 does not).
        image_start_token_id (8197, `<racm3:break>`), image_end_token_id (8196, `<eoss>`),
        image_row_end_token_id (8803), size_token_base_id (8804: a side of n grid units is `8804 + n`),
        max_size_units (largest n a size token may carry), image_code_id_start / image_code_id_end
        (4..8195 inclusive: the ids of image-code tokens), separator_token_id (8710),
        image_placeholder_token_id (8711, `<image>`: where the model fills in codes from `pixel_values`),
        patch_size (32: the size tokens' grid unit in pixels).
        vocabulary_map (`dict`): token name -> id for the image-code tokens (`IMGIMG...Z`); the code<->id
            maps are built from it, never from `id = code + 4`. Built with that default order if absent.
    """

    model_type = "lumina_mgpt"
    sub_configs_defaults = {"vq_config": LuminaMGPTVQConfig}

    bos_token_id: int | None = 0
    pad_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 8710

    dropout: float | int = 0.0
    mask_image_logits: bool = False
    z_loss_weight: float | int = 0.0
    qk_norm_layout: str = "grouped"

    image_start_token_id: int = 8197
    image_end_token_id: int = 8196
    image_row_end_token_id: int = 8803
    size_token_base_id: int = 8804
    max_size_units: int = 128
    image_code_id_start: int = 4
    image_code_id_end: int = 8195
    separator_token_id: int = 8710
    image_placeholder_token_id: int = 8711
    patch_size: int = 32

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)
        archs = self.architectures or []
        # The published checkpoints carry a taming-style vq_config: translate it.
        if isinstance(self.vq_config, dict):
            self.vq_config = taming_to_vq_config_dict(self.vq_config)
            self.vq_config.pop("model_type", None)
        if any("XLLMX" in a or a.startswith("Chameleon") for a in archs):
            self.architectures = ["LuminaMGPTForConditionalGeneration"]
        if self.vocabulary_map is None:
            n_codes = self.image_code_id_end - self.image_code_id_start + 1
            self.vocabulary_map = {
                image_code_token_name(c): self.image_code_id_start + c for c in range(n_codes)
            }
            self.vocabulary_map["<image>"] = self.image_placeholder_token_id
        super().__post_init__(**kwargs)
        self.validate_unirep_ids()
        self.validate_rope()

    def validate_rope(self) -> None:
        """`rope_theta` must be a positive number (a string such as "1e4" would only fail deep inside the model)."""
        theta = (self.rope_parameters or {}).get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"rope_theta must be a positive number (10000.0 for Lumina-mGPT), got {theta!r} in the config.")

    # ------------------------------------------------------------------ UniRep helpers
    def validate_unirep_ids(self) -> None:
        """Raise a `ValueError` naming the problem when the UniRep ids are inconsistent."""
        v = self.vocab_size
        lo, hi = self.image_code_id_start, self.image_code_id_end
        if not (0 <= lo <= hi < v):
            raise ValueError(
                f"image_code_id_start..image_code_id_end = {lo}..{hi} must be a range inside the vocabulary "
                f"(vocab_size={v}); the published values are 4..8195."
            )
        named = {
            "image_start_token_id": self.image_start_token_id,
            "image_end_token_id": self.image_end_token_id,
            "image_row_end_token_id": self.image_row_end_token_id,
            "separator_token_id": self.separator_token_id,
        }
        for name, tid in named.items():
            if not 0 <= tid < v:
                raise ValueError(f"{name}={tid} is outside the vocabulary (vocab_size={v}).")
            if lo <= tid <= hi:
                raise ValueError(
                    f"{name}={tid} falls inside the image-code id range {lo}..{hi}; special tokens must be "
                    "outside it (published: start 8197, end 8196, row end 8803, separator 8710)."
                )
        seen: dict[int, str] = {}
        for name, tid in named.items():
            if tid in seen:
                raise ValueError(f"{name} and {seen[tid]} are both {tid}: every UniRep token needs its own id.")
            seen[tid] = name
        size_lo, size_hi = self.size_token_base_id + 1, self.size_token_base_id + self.max_size_units
        if size_lo <= lo <= size_hi or size_lo <= hi <= size_hi or lo <= size_lo <= hi or size_hi >= v:
            raise ValueError(
                f"size tokens {size_lo}..{size_hi} (size_token_base_id={self.size_token_base_id}, "
                f"max_size_units={self.max_size_units}) must lie inside the vocabulary and outside the "
                f"image-code range {lo}..{hi}."
            )
        for name, tid in named.items():
            if size_lo <= tid <= size_hi:
                raise ValueError(f"{name}={tid} collides with the size tokens {size_lo}..{size_hi}.")
        if self.qk_norm_layout not in ("grouped", "per_head"):
            raise ValueError(f"qk_norm_layout must be 'grouped' or 'per_head', got {self.qk_norm_layout!r}.")
        mp = self.model_parallel_size or 1
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % mp or kv % mp:
            raise ValueError(
                f"model_parallel_size={mp} must divide num_attention_heads={self.num_attention_heads} and "
                f"num_key_value_heads={kv} for the grouped q/k-norm layout."
            )
        if self.patch_size % 16:
            raise ValueError(f"patch_size={self.patch_size} must be a multiple of the VQGAN factor 16.")

    def image_code_to_token_id(self) -> list[int]:
        """List mapping VQ code -> token id, read from `vocabulary_map` (length = codebook size)."""
        table = image_code_table(self.vocabulary_map, self.vq_config.num_embeddings)
        bad = [t for t in table if not (self.image_code_id_start <= t <= self.image_code_id_end)]
        if bad:
            raise ValueError(
                f"vocabulary_map puts image codes at ids {bad[:5]} outside image_code_id_start..image_code_id_end "
                f"({self.image_code_id_start}..{self.image_code_id_end})."
            )
        return table

    @property
    def unirep(self) -> UniRepLayout:
        """The UniRep layout (token ids, size units) this config describes."""
        return UniRepLayout.from_config(self)

    def size_token_id(self, units: int) -> int:
        if not 1 <= units <= self.max_size_units:
            raise ValueError(f"an image side of {units} grid units is outside 1..{self.max_size_units}.")
        return self.size_token_base_id + units


__all__ = ["LuminaMGPTConfig", "LuminaMGPTVQConfig"]
