"""Lumina-mGPT model classes, built on transformers' Chameleon decoder.

What differs from stock `ChameleonForConditionalGeneration` (SPEC.md section 1):
- image-code logits are *not* masked (unless `config.mask_image_logits`), so the model can write images
  and a loss on image labels is finite;
- residual dropout on the attention and MLP outputs in training (`config.dropout`);
- optional z-loss in `forward` (`config.z_loss_weight`);
- q/k-norm in the published grouped layout `[model_parallel_size, head_dim]` or stock per-head layout;
- `model.vqmodel` is the full VQGAN (encoder + decoder), kept in float32.
"""


import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChameleonModel, ChameleonPreTrainedModel, GenerationMixin
# diffusers' pipeline loader finds a component's load method by looking up its base class by name in the
# component's module: keep `PreTrainedModel` importable from here.
from transformers import PreTrainedModel  # noqa: F401
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_lumina_mgpt import LuminaMGPTConfig
from .modeling_vqgan import LuminaMGPTVQGAN

logger = logging.getLogger(__name__)


class GroupedHeadLayerNorm(nn.Module):
    """LayerNorm over `head_dim` applied per head, with weight/bias stored per model-parallel group
    (`[groups, head_dim]`) and repeat-interleaved to the heads at run time (`num_heads / groups` copies
    each). With `groups == num_heads` it is the stock per-head layout. Input `(..., num_heads, head_dim)`."""

    def __init__(self, groups: int, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.num_heads, self.eps = groups, num_heads, eps
        self.weight = nn.Parameter(torch.ones(groups, head_dim))
        self.bias = nn.Parameter(torch.zeros(groups, head_dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.layer_norm(hidden_states, hidden_states.shape[-1:], None, None, eps=self.eps)
        reps = self.num_heads // self.groups
        weight, bias = self.weight, self.bias
        if reps != 1:
            weight = weight.repeat_interleave(reps, dim=0)
            bias = bias.repeat_interleave(reps, dim=0)
        return hidden_states * weight + bias

    def extra_repr(self) -> str:
        return f"groups={self.groups}, num_heads={self.num_heads}, head_dim={self.weight.shape[-1]}"


def _image_code_tables(config: LuminaMGPTConfig) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(code -> token id, token id -> code or -1) lookup tables built from `config.vocabulary_map`."""
    table = torch.tensor(config.image_code_to_token_id(), dtype=torch.long)
    inverse = torch.full((config.vocab_size,), -1, dtype=torch.long)
    inverse[table] = torch.arange(table.numel())
    return table, inverse


def _residual_dropout_hook(module: nn.Module, args, output):
    """Forward hook: dropout on a sub-layer's output before the residual add (training only)."""
    p = module.residual_dropout_p
    if not (module.training and p > 0):
        return output
    if isinstance(output, tuple):
        return (F.dropout(output[0], p=p, training=True),) + tuple(output[1:])
    return F.dropout(output, p=p, training=True)


class LuminaMGPTPreTrainedModel(ChameleonPreTrainedModel):
    config: LuminaMGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _can_compile_fullgraph = True
    _no_split_modules = ["ChameleonDecoderLayer", "ChameleonSwinDecoderLayer", "LuminaMGPTVQGAN"]
    # The VQGAN is kept in float32 whatever dtype is asked for (the reference runs it in fp32).
    _keep_in_fp32_modules_strict = ["vqmodel"]

    def _init_weights(self, module):
        super()._init_weights(module)
        # Non-persistent buffers are not in checkpoints: `from_pretrained` builds the model without running
        # `__init__`'s tensor code for real, so the code<->id tables must be (re)computed here.
        if isinstance(module, LuminaMGPTModel):
            table, inverse = _image_code_tables(module.config)
            init.copy_(module.image_code_to_id, table)
            init.copy_(module.image_id_to_code, inverse)

    # ------------------------------------------------------------------ loading / saving
    def _vqmodel_prefix(self) -> str | None:
        """State-dict prefix of the VQGAN (`model.vqmodel.` or `vqmodel.`), None if this model has none."""
        for name, module in self.named_modules():
            if isinstance(module, LuminaMGPTVQGAN):
                return name + "."
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        prefix = model._vqmodel_prefix()
        if prefix is None:
            return (model, info) if want_info else model
        missing = tuple(sorted(k[len(prefix) :] for k in info.get("missing_keys", ()) if k.startswith(prefix)))
        vqmodel = model.get_submodule(prefix[:-1])
        vqmodel.missing_weights = missing
        # transformers keeps *loaded* VQ tensors in fp32 (`_keep_in_fp32_modules_strict`) but creates missing ones
        # in the requested dtype: restore the fp32 invariant so VQ weights loaded later are not rounded.
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in vqmodel.parameters()):
            vqmodel.to(torch.float32)
        if missing:
            logger.warning(
                "%s has no VQGAN weights (%d tensors missing, e.g. %s): the language model is loaded, but "
                "encoding/decoding images needs Meta's Chameleon VQGAN. Convert with `lumina-hf convert "
                "--checkpoint ... --vqgan <dir with vqgan.yaml and vqgan.ckpt>`.",
                pretrained_model_name_or_path,
                len(missing),
                missing[0],
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A VQGAN that was never loaded is random: do not write it (a reload then reports it missing again
        # instead of silently decoding noise).
        prefix = self._vqmodel_prefix()
        if prefix is not None and self.get_submodule(prefix[:-1]).missing_weights and "state_dict" not in kwargs:
            kwargs["state_dict"] = {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}
        return super().save_pretrained(save_directory, *args, **kwargs)


class LuminaMGPTModel(ChameleonModel, LuminaMGPTPreTrainedModel):
    """The Chameleon decoder (`embed_tokens`, `layers`, `norm`) with the full VQGAN as `vqmodel` and the
    code<->token-id maps built from `config.vocabulary_map`. Forward takes `input_ids` `(batch, seq)` and
    returns hidden states `(batch, seq, hidden_size)`."""

    config: LuminaMGPTConfig

    def __init__(self, config: LuminaMGPTConfig):
        super().__init__(config)
        # Stock Chameleon holds an encoder-only VQ-VAE: replace it with the full VQGAN.
        self.vqmodel = LuminaMGPTVQGAN._from_config(config.vq_config)
        if config.qk_norm_layout == "grouped":
            mp = config.model_parallel_size or 1
            for layer in self.layers:
                attn = layer.self_attn
                attn.q_norm = GroupedHeadLayerNorm(mp, attn.num_heads, attn.head_dim)
                attn.k_norm = GroupedHeadLayerNorm(mp, attn.num_key_value_heads, attn.head_dim)
        if config.dropout and config.dropout > 0:
            for layer in self.layers:
                for sub in (layer.self_attn, layer.mlp):
                    sub.residual_dropout_p = float(config.dropout)
                    sub.register_forward_hook(_residual_dropout_hook)

        table, inverse = _image_code_tables(config)
        self.register_buffer("image_code_to_id", table, persistent=False)
        self.register_buffer("image_id_to_code", inverse, persistent=False)
        self.post_init()

    def codes_to_token_ids(self, codes: torch.LongTensor) -> torch.LongTensor:
        return self.image_code_to_id.to(codes.device)[codes]

    def token_ids_to_codes(self, ids: torch.LongTensor) -> torch.LongTensor:
        codes = self.image_id_to_code.to(ids.device)[ids]
        if codes.numel() and int(codes.min()) < 0:
            bad = ids[codes < 0][:5].tolist()
            raise ValueError(f"token ids {bad} are not image-code tokens of this model's VQGAN codebook.")
        return codes

    def forward(self, input_ids=None, pixel_values=None, **kwargs) -> BaseModelOutputWithPast:
        if pixel_values is not None:
            raise ValueError(
                "LuminaMGPTModel takes token ids only: pass pixel_values to "
                "LuminaMGPTForConditionalGeneration (it fills the image placeholders with VQ codes)."
            )
        return super().forward(input_ids=input_ids, **kwargs)


class LuminaMGPTForConditionalGeneration(LuminaMGPTPreTrainedModel, GenerationMixin):
    """Lumina-mGPT: a Chameleon decoder with an untied LM head over the 65536-token vocabulary.

    `forward(input_ids (batch, seq), ..., labels (batch, seq))` returns logits `(batch, seq, vocab)` and,
    with labels, the shifted cross-entropy (+ z-loss when `config.z_loss_weight > 0`). When `pixel_values`
    is given, each run of `image_placeholder_token_id` in `input_ids` (and in `labels`) is replaced by the
    VQ codes of the next image, in order.
    """

    config: LuminaMGPTConfig
    _tied_weights_keys = {}

    def __init__(self, config: LuminaMGPTConfig):
        super().__init__(config)
        self.model = LuminaMGPTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # ------------------------------------------------------------------ images <-> tokens
    @property
    def vqmodel(self) -> LuminaMGPTVQGAN:
        return self.model.vqmodel

    def encode_images(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """`(B, 3, H, W)` pixels in [-1, 1] -> image-code token ids `(B, H/16, W/16)` (not wrapped in UniRep)."""
        codes = self.vqmodel.encode_to_codes(pixel_values.to(self.vqmodel.quant_conv.weight.device))
        return self.model.codes_to_token_ids(codes)

    def decode_image_tokens(
        self, image_tokens: torch.LongTensor, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Image-code token ids -> pixels in [-1, 1] (float32, clamped).

        `image_tokens` is `(B, rows, cols)`, or `(B, rows * cols)` with `height`/`width` in pixels. Row-end
        and other UniRep tokens must already be removed (the processor's `decode_images` does that)."""
        if image_tokens.ndim == 2:
            if height is None or width is None:
                raise ValueError("flat image tokens need height and width (pixels) to be reshaped into a grid.")
            f = self.vqmodel.downsample_factor
            if height % f or width % f:
                raise ValueError(f"height {height} and width {width} must be multiples of {f}.")
            if image_tokens.shape[1] != (height // f) * (width // f):
                raise ValueError(
                    f"{image_tokens.shape[1]} tokens do not make a {width}x{height} image "
                    f"({(height // f) * (width // f)} expected)."
                )
            image_tokens = image_tokens.view(image_tokens.shape[0], height // f, width // f)
        elif image_tokens.ndim != 3:
            raise ValueError(f"image_tokens must be (B, rows, cols) or (B, n), got {tuple(image_tokens.shape)}.")
        codes = self.model.token_ids_to_codes(image_tokens)
        return self.vqmodel.decode_codes(codes).clamp(-1, 1)

    def fill_image_placeholders(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | list[torch.Tensor],
        labels: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, torch.LongTensor | None]:
        """Replace the placeholder runs in `input_ids` (and `labels`) with the codes of `pixel_values`
        (a `(N, 3, H, W)` tensor or a list of `(3, H, W)` / `(1, 3, H, W)` tensors, in reading order)."""
        images = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else list(pixel_values.unbind(0))
        placeholder = self.config.image_placeholder_token_id
        mask = input_ids == placeholder
        codes = [self.encode_images(img if img.ndim == 4 else img.unsqueeze(0)).flatten() for img in images]
        flat = torch.cat(codes).to(input_ids.device) if codes else input_ids.new_empty(0)
        n_slots = int(mask.sum())
        if n_slots != flat.numel():
            raise ValueError(
                f"input_ids hold {n_slots} image placeholder tokens but the {len(images)} image(s) give "
                f"{flat.numel()} codes: the images must be the ones the processor laid out, in the same order."
            )
        input_ids = input_ids.masked_scatter(mask, flat)
        if labels is not None:
            # Trained images (assistant turns) carry placeholders in labels too; user-turn images are -100.
            lmask = labels == placeholder
            if bool((lmask & ~mask).any()):
                raise ValueError("labels mark image placeholders at positions where input_ids have none.")
            labels = torch.where(lmask, input_ids, labels)
        return input_ids, labels

    # ------------------------------------------------------------------ forward
    def get_image_tokens(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        return self.encode_images(pixel_values).flatten(1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids with image placeholders (from the processor).")
            input_ids, labels = self.fill_image_placeholders(input_ids, pixel_values, labels)
        kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{k: v for k, v in kwargs.items() if k not in ("num_items_in_batch",)},
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        if self.config.mask_image_logits:
            start, end = self.config.image_code_id_start, self.config.image_code_id_end
            logits[:, :, start : end + 1] = torch.finfo(logits.dtype).min

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
            if self.config.z_loss_weight:
                loss = loss + self.config.z_loss_weight * z_loss(logits, labels)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, **kwargs):
        """`GenerationMixin.generate` for text answers; `pixel_values` fill the image placeholders first.
        Image generation with guidance lives in `lumina_hf.generation_lumina_mgpt.generate_images`."""
        if pixel_values is not None:
            input_ids, _ = self.fill_image_placeholders(input_ids, pixel_values)
        # `generation_config.guidance_scale` holds the *image* guidance the pipeline uses (4.0); transformers
        # would apply it to text as its own second-forward CFG. Text generation is unguided unless asked.
        kwargs.setdefault("guidance_scale", 1.0)
        return super().generate(input_ids=input_ids, **kwargs)


def z_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """`mean(logsumexp(shift_logits)^2)` over the positions whose (shifted) label is not ignored (SPEC.md 1).

    `logits` `(batch, seq, vocab)`, `labels` `(batch, seq)` unshifted, as passed to `forward`."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    keep = shift_labels >= 0
    if not bool(keep.any()):
        return shift_logits.sum() * 0.0
    lse = torch.logsumexp(shift_logits[keep], dim=-1)
    return (lse**2).mean()


__all__ = [
    "LuminaMGPTForConditionalGeneration",
    "LuminaMGPTModel",
    "LuminaMGPTPreTrainedModel",
    "GroupedHeadLayerNorm",
    "z_loss",
]
