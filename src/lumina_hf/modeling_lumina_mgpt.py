"""Lumina-mGPT model classes, built on transformers' Chameleon decoder.

What differs from stock `ChameleonForConditionalGeneration`:
- image-code logits are *not* masked (unless `config.mask_image_logits`), so the model can write images
  and a loss on image labels is finite;
- residual dropout on the attention and MLP outputs in training (`config.dropout`);
- optional z-loss in `forward` (`config.z_loss_weight`);
- q/k-norm in the published grouped layout `[model_parallel_size, head_dim]` or stock per-head layout;
- `model.vqmodel` is the full VQGAN (encoder + decoder), kept in float32.
"""


import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChameleonModel, ChameleonPreTrainedModel, GenerationMixin
# The decoder building blocks are subclassed as transformers' own modular models do (Emu3, Janus); they are
# importable from Chameleon's modeling module but not listed in its `__all__`: no public path exists for them.
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonAttention,
    ChameleonDecoderLayer,
    ChameleonRMSNorm,
    ChameleonRotaryEmbedding,
    ChameleonSwinDecoderLayer,
)
# diffusers' pipeline loader finds a component's load method by looking up its base class by name in the
# component's module: keep `PreTrainedModel` importable from here.
from transformers import PreTrainedModel  # noqa: F401
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

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


class LuminaMGPTAttention(ChameleonAttention):
    """Chameleon attention whose q/k-norm follows `config.qk_norm_layout`: "grouped" holds one LayerNorm
    weight/bias per model-parallel group (the published checkpoints), "per_head" one per head (stock)."""

    def __init__(self, config: LuminaMGPTConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        if config.qk_norm_layout == "grouped":
            groups = config.model_parallel_size or 1
            self.q_norm = GroupedHeadLayerNorm(groups, self.num_heads, self.head_dim)
            self.k_norm = GroupedHeadLayerNorm(groups, self.num_key_value_heads, self.head_dim)


class _LuminaLayerParts:
    """What both Lumina decoder layers add to the stock ones: the Lumina attention and two residual dropouts."""

    def _add_lumina_parts(self, config: LuminaMGPTConfig, layer_idx: int) -> None:
        self.self_attn = LuminaMGPTAttention(config, layer_idx)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.mlp_dropout = nn.Dropout(config.dropout)


class LuminaMGPTDecoderLayer(_LuminaLayerParts, ChameleonDecoderLayer):
    """Pre-norm Chameleon decoder layer (7B) with residual dropout (`config.dropout`, training only) on the
    attention and MLP outputs before each residual add."""

    def __init__(self, config: LuminaMGPTConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self._add_lumina_parts(config, layer_idx)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs,
        )
        hidden_states = residual + self.attn_dropout(hidden_states)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return (residual + self.mlp_dropout(hidden_states),)


class LuminaMGPTSwinDecoderLayer(_LuminaLayerParts, ChameleonSwinDecoderLayer):
    """Post-norm ("swin norm") Chameleon decoder layer (34B) with the same residual dropout, applied to the
    attention and MLP outputs before their norms."""

    def __init__(self, config: LuminaMGPTConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self._add_lumina_parts(config, layer_idx)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
        )
        hidden_states = residual + self.input_layernorm(self.attn_dropout(hidden_states))
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(self.mlp_dropout(self.mlp(hidden_states)))
        return (residual + hidden_states,)


def _check_language_model_weights(model, source, info: dict, vq_prefix: str | None) -> None:
    """Missing or unexpected language-model weights mean the config does not describe the checkpoint (e.g. fewer
    layers than the weights have): refuse instead of computing with random or dropped layers. A missing VQGAN is
    allowed (the published checkpoints have none) and reported separately; the LM head of a full checkpoint is
    expected to be left out when only the base model is loaded."""
    def language(keys):
        return sorted(k for k in keys if not (vq_prefix and k.startswith(vq_prefix)))

    missing = language(info.get("missing_keys", ()))
    unexpected = language(info.get("unexpected_keys", ()))
    if model.get_output_embeddings() is None:
        unexpected = [k for k in unexpected if not k.startswith("lm_head.")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights the config needs are not in the checkpoint (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} weights of the checkpoint have no place in the model (e.g. {unexpected[0]})")
        raise ValueError(
            f"{source}: {' and '.join(parts)}: its config.json does not describe these weights (layer count, sizes). "
            "Use the config the checkpoint was saved with."
        )


def _check_load_request(source, kwargs: dict) -> None:
    """Quantization and `max_memory` requests of `from_pretrained` that cannot work, refused before loading."""
    from .quantization import check_quantization_request, describe_config

    quantization_config = kwargs.get("quantization_config")
    check_quantization_request(quantization_config, kwargs.get("device_map"))
    max_memory = kwargs.get("max_memory")
    if not max_memory:
        return
    from .memory import check_weights_fit

    config = kwargs.get("config")
    if not isinstance(config, LuminaMGPTConfig):
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "local_files_only") if kwargs.get(k) is not None}
        config = LuminaMGPTConfig.from_pretrained(source, **hub)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kind = describe_config(quantization_config)[1] if quantization_config is not None and not isinstance(quantization_config, dict) else None
    check_weights_fit(config, max_memory, dtype, kind, kwargs.get("offload_folder"))


class LuminaMGPTPreTrainedModel(ChameleonPreTrainedModel):
    config: LuminaMGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _can_compile_fullgraph = True
    _no_split_modules = ["LuminaMGPTDecoderLayer", "LuminaMGPTSwinDecoderLayer", "LuminaMGPTVQGAN"]
    _can_record_outputs = {
        "hidden_states": [LuminaMGPTDecoderLayer, LuminaMGPTSwinDecoderLayer],
        "attentions": LuminaMGPTAttention,
    }
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
        """`PreTrainedModel.from_pretrained`, plus checks made before any weight is read: a quantization that cannot
        run here (backend not installed; torchao int4 or bitsandbytes without the weights loaded onto a CUDA GPU) and
        a `max_memory` that cannot hold the weights even spread over all its devices (without "disk" or an
        `offload_folder`) are refused with the fix in the message (`lumina_hf.quantization`, `lumina_hf.memory`)."""
        _check_load_request(pretrained_model_name_or_path, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        prefix = model._vqmodel_prefix()
        _check_language_model_weights(model, pretrained_model_name_or_path, info, prefix)
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

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        variant: str | None = None,
        token: str | bool | None = None,
        save_peft_format: bool = True,
        safe_serialization: bool = True,
        **kwargs,
    ):
        """`PreTrainedModel.save_pretrained` with its arguments named, so that diffusers' pipeline saving (which
        passes only the arguments a component's signature names) forwards `variant`, `max_shard_size` and
        `safe_serialization`. Weights are always written as safetensors.

        A VQGAN that was never loaded is random and is not written: a reload then reports it missing again
        instead of silently decoding noise."""
        if not safe_serialization:
            raise ValueError("Lumina-mGPT models are saved as safetensors only: leave safe_serialization=True.")
        prefix = self._vqmodel_prefix()
        if prefix is not None and self.get_submodule(prefix[:-1]).missing_weights and state_dict is None:
            state_dict = {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}
        return super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            state_dict=state_dict,
            push_to_hub=push_to_hub,
            max_shard_size=max_shard_size,
            variant=variant,
            token=token,
            save_peft_format=save_peft_format,
            **kwargs,
        )


class LuminaMGPTModel(ChameleonModel, LuminaMGPTPreTrainedModel):
    """The Chameleon decoder (`embed_tokens`, `layers`, `norm`) with the full VQGAN as `vqmodel` and the
    code<->token-id maps built from `config.vocabulary_map`.

    Forward takes `input_ids` or `inputs_embeds` `(batch, seq)` and returns hidden states
    `(batch, seq, hidden_size)`. With `pixel_values`, each image's VQ codes replace the next run of
    `config.image_placeholder_token_id` (in `input_ids`, or the placeholder's embedding in `inputs_embeds`), in
    reading order, as Chameleon fills its image placeholders."""

    config: LuminaMGPTConfig

    def __init__(self, config: LuminaMGPTConfig):
        # Not `ChameleonModel.__init__`: it would build the stock decoder layers and the encoder-only VQ-VAE,
        # both replaced here (a 7B would be initialised twice).
        LuminaMGPTPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layer_cls = LuminaMGPTSwinDecoderLayer if config.swin_norm else LuminaMGPTDecoderLayer
        self.layers = nn.ModuleList([layer_cls(config, i) for i in range(config.num_hidden_layers)])
        self.norm = ChameleonRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ChameleonRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        # The VQGAN runs in float32 whatever dtype the language model is built in (the reference does).
        self.vqmodel = LuminaMGPTVQGAN._from_config(config.vq_config).to(torch.float32)
        table, inverse = _image_code_tables(config)
        self.register_buffer("image_code_to_id", table, persistent=False)
        self.register_buffer("image_id_to_code", inverse, persistent=False)
        self.post_init()

    # ------------------------------------------------------------------ images <-> tokens
    def codes_to_token_ids(self, codes: torch.LongTensor) -> torch.LongTensor:
        return self.image_code_to_id.to(codes.device)[codes]

    def token_ids_to_codes(self, ids: torch.LongTensor) -> torch.LongTensor:
        codes = self.image_id_to_code.to(ids.device)[ids]
        if codes.numel() and int(codes.min()) < 0:
            bad = ids[codes < 0][:5].tolist()
            raise ValueError(f"token ids {bad} are not image-code tokens of this model's VQGAN codebook.")
        return codes

    def encode_images(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """`(B, 3, H, W)` pixels in [-1, 1] -> image-code token ids `(B, H/16, W/16)` (not wrapped in UniRep)."""
        from .offload import execution_device  # the VQGAN's weights sit on "meta" under CPU offload

        codes = self.vqmodel.encode_to_codes(pixel_values.to(execution_device(self.vqmodel.quant_conv)))
        return self.codes_to_token_ids(codes)

    def get_image_tokens(self, pixel_values: torch.Tensor | list[torch.Tensor]) -> torch.LongTensor:
        """The code token ids of every image, concatenated in reading order (1-D): what fills the placeholders.
        `pixel_values` is a `(N, 3, H, W)` tensor or a list of `(3, H, W)` / `(1, 3, H, W)` tensors (sizes may
        differ between images)."""
        images = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else list(pixel_values.unbind(0))
        codes = [self.encode_images(img if img.ndim == 4 else img.unsqueeze(0)).flatten() for img in images]
        return torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long, device=self.embed_tokens.weight.device)

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """`(batch, seq)` bool mask of the image placeholder positions, read from `input_ids` or, without them,
        from the positions whose embedding is the placeholder token's."""
        if input_ids is not None:
            return input_ids == self.config.image_placeholder_token_id
        placeholder = torch.tensor(self.config.image_placeholder_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.embed_tokens(placeholder)).all(-1)

    def fill_image_placeholders(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | list[torch.Tensor],
        labels: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, torch.LongTensor | None]:
        """Replace the placeholder runs in `input_ids` (and `labels`) with the code token ids of `pixel_values`."""
        mask = self.get_placeholder_mask(input_ids, None)
        flat = self.get_image_tokens(pixel_values).to(input_ids.device)
        _check_placeholder_count(mask, flat.numel())
        input_ids = input_ids.masked_scatter(mask, flat)
        if labels is not None:
            # Trained images (assistant turns) carry placeholders in labels too; user-turn images are -100.
            lmask = labels == self.config.image_placeholder_token_id
            if bool((lmask & ~mask).any()):
                raise ValueError("labels mark image placeholders at positions where input_ids have none.")
            labels = torch.where(lmask, input_ids, labels)
        return input_ids, labels

    def fill_image_embeddings(self, inputs_embeds: torch.Tensor, pixel_values) -> torch.Tensor:
        """Put the embeddings of the images' code tokens at the placeholder positions of `inputs_embeds`."""
        mask = self.get_placeholder_mask(None, inputs_embeds)
        flat = self.get_image_tokens(pixel_values).to(inputs_embeds.device)
        _check_placeholder_count(mask, flat.numel())
        features = self.embed_tokens(flat).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if pixel_values is not None:
            if input_ids is not None:
                input_ids, _ = self.fill_image_placeholders(input_ids, pixel_values)
            elif inputs_embeds is not None:
                inputs_embeds = self.fill_image_embeddings(inputs_embeds, pixel_values)
            else:
                raise ValueError("pixel_values need input_ids (or inputs_embeds) with image placeholders from the processor.")
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )


def _check_placeholder_count(mask: torch.Tensor, n_codes: int) -> None:
    n_slots = int(mask.sum())
    if n_slots != n_codes:
        raise ValueError(
            f"the inputs hold {n_slots} image placeholder tokens but the images give {n_codes} codes: the images "
            "must be the ones the processor laid out, in the same order."
        )


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
        return self.model.encode_images(pixel_values)

    def get_image_tokens(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """`(B, 3, H, W)` pixels -> `(B, H/16 * W/16)` image-code token ids."""
        return self.encode_images(pixel_values).flatten(1)

    def fill_image_placeholders(self, input_ids, pixel_values, labels=None):
        """See `LuminaMGPTModel.fill_image_placeholders`."""
        return self.model.fill_image_placeholders(input_ids, pixel_values, labels)

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

    # ------------------------------------------------------------------ forward
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if pixel_values is not None and labels is not None:
            if input_ids is None:
                raise ValueError("training on images needs input_ids with image placeholders (from the processor).")
            # the codes of trained images (assistant turns) are labels as well
            input_ids, labels = self.fill_image_placeholders(input_ids, pixel_values, labels)
            pixel_values = None
        if "past_key_values" in kwargs:
            # the name transformers used before 5.24 (and Chameleon still accepts until 5.40), e.g. from older callers
            warnings.warn("`past_key_values` is deprecated: pass the cache as `cache`.", FutureWarning, stacklevel=3)
            legacy = kwargs.pop("past_key_values")
            cache = legacy if cache is None else cache
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
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
                logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                num_items_in_batch=num_items_in_batch, **kwargs,
            )
            if self.config.z_loss_weight:
                loss = loss + self.config.z_loss_weight * z_loss(logits, labels)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
        """`GenerationMixin.generate` for text answers; `pixel_values` fill the image placeholders of `input_ids`
        and/or `inputs_embeds` first. Image generation with guidance lives in
        `lumina_hf.generation_lumina_mgpt.generate_image_tokens`."""
        if pixel_values is not None:
            if input_ids is None and inputs_embeds is None:
                raise ValueError("pixel_values need input_ids (or inputs_embeds) with image placeholders from the processor.")
            if input_ids is not None:
                input_ids, _ = self.fill_image_placeholders(input_ids, pixel_values)
            if inputs_embeds is not None:
                inputs_embeds = self.model.fill_image_embeddings(inputs_embeds, pixel_values)
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        # `generation_config.guidance_scale` holds the *image* guidance the pipeline uses (4.0); transformers
        # would apply it to text as its own second-forward CFG. Text generation is unguided unless asked.
        kwargs.setdefault("guidance_scale", 1.0)
        return super().generate(input_ids=input_ids, **kwargs)


def z_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """`mean(logsumexp(shift_logits)^2)` over the positions whose (shifted) label is not ignored.

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
