"""The full Chameleon VQGAN: transformers' encoder and quantizer (`ChameleonVQVAE`), plus the decoder that
transformers lacks.

Parameter names follow Meta's `tokenizer/vqgan.ckpt` (taming-transformers `VQModel`) one to one:
`encoder.*`, `quantize.embedding.weight`, `quant_conv.*`, `post_quant_conv.*`, `decoder.*`, so a
converted checkpoint is a plain rename-free copy under `model.vqmodel.`.
"""


import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChameleonVQVAE

from .configuration_lumina_mgpt import LuminaMGPTVQConfig


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class LuminaMGPTVQResnetBlock(nn.Module):
    """taming `ResnetBlock`: (GroupNorm, swish, 3x3 conv) twice, plus a 1x1 `nin_shortcut` when the channel
    count changes. Written here because transformers keeps its copy out of its public API."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(hidden_states))
        h = self.conv2(self.dropout(F.silu(self.norm2(self.conv1(h)))))
        shortcut = self.nin_shortcut(hidden_states) if hasattr(self, "nin_shortcut") else hidden_states
        return shortcut + h


class LuminaMGPTVQAttnBlock(nn.Module):
    """taming `AttnBlock`: single-head self-attention over the spatial positions with 1x1 q/k/v/proj_out convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, c, h, w = hidden_states.shape
        x = self.norm(hidden_states)
        q = self.q(x).reshape(b, c, h * w).transpose(1, 2)  # (b, hw, c)
        k = self.k(x).reshape(b, c, h * w)  # (b, c, hw)
        v = self.v(x).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (b, hw query, hw key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return hidden_states + self.proj_out(out)


class LuminaMGPTVQUpsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (taming `Upsample(with_conv=True)`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class LuminaMGPTVQDecoder(nn.Module):
    """taming-transformers `Decoder`: conv_in, mid (res, attn, res), `num_res_blocks + 1` residual blocks
    per level from the coarsest up, nearest x2 upsampling between levels, GroupNorm + swish + conv_out.
    Input `(batch, latent_channels, h, w)`, output `(batch, out_channels, 16h, 16w)` for the published
    five-level layout. No tanh at the output."""

    def __init__(self, config: LuminaMGPTVQConfig):
        super().__init__()
        ch, mult = config.base_channels, list(config.channel_multiplier)
        self.num_resolutions = len(mult)
        self.num_res_blocks = config.num_res_blocks
        attn_res = set(config.attn_resolutions or [])
        block_in = ch * mult[-1]
        curr_res = config.resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(config.latent_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = LuminaMGPTVQResnetBlock(block_in, block_in, config.dropout)
        self.mid.attn_1 = LuminaMGPTVQAttnBlock(block_in)
        self.mid.block_2 = LuminaMGPTVQResnetBlock(block_in, block_in, config.dropout)

        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * mult[i_level]
            for _ in range(self.num_res_blocks + 1):
                block.append(LuminaMGPTVQResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if curr_res in attn_res:
                    attn.append(LuminaMGPTVQAttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = LuminaMGPTVQUpsample(block_in)
                curr_res *= 2
            levels.insert(0, up)  # `up[i]` is level i, as in the checkpoint
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latents)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        h = self.norm_out(h)
        h = h * torch.sigmoid(h)
        return self.conv_out(h)


class LuminaMGPTVQGAN(ChameleonVQVAE):
    """Chameleon VQGAN with encoder, quantizer and decoder.

    - `encode_to_codes(pixel_values)`: `(B, 3, H, W)` in [-1, 1], H and W multiples of 16 -> `(B, H/16, W/16)`
      codes (raster order).
    - `decode_codes(codes)`: `(B, h, w)` codes -> `(B, 3, 16h, 16w)` pixels (unclamped, roughly [-1, 1]).

    Kept in float32 whatever dtype the language model uses (see `_apply`).
    """

    config: LuminaMGPTVQConfig
    _no_split_modules = ["LuminaMGPTVQDecoder", "ChameleonVQVAEEncoder", "ChameleonVQVAEVectorQuantizer"]

    def __init__(self, config: LuminaMGPTVQConfig):
        super().__init__(config)
        self.decoder = LuminaMGPTVQDecoder(config)
        # Set by `LuminaMGPTForConditionalGeneration.from_pretrained` when the checkpoint had no VQ weights.
        self.missing_weights: tuple[str, ...] = ()
        self.post_init()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_multiplier) - 1)

    def _apply(self, fn, recurse=True):
        # The VQGAN runs in float32 in the reference: `.to(bfloat16)` / `.half()` on the parent model move
        # it between devices but must not lower its precision. Redo the move without the cast (undoing a
        # cast afterwards would lose the float32 bits). torch has no public hook to veto a cast: `_apply` is
        # the one place every `.to()`/`.half()`/`.cuda()` goes through.
        def keep_fp32(t):
            out = fn(t)
            if t.is_floating_point() and t.dtype == torch.float32 and out.dtype != torch.float32:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_fp32, recurse)

    def _require(self, part: str) -> None:
        missing = [m for m in self.missing_weights if m.split(".")[0] in (part, "quantize")]
        if missing:
            raise ValueError(
                f"This model has no trained VQGAN {part} weights (missing from the checkpoint: "
                f"{', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}). The published Lumina-mGPT checkpoints do "
                "not contain the VQGAN: convert them with `lumina-hf convert --checkpoint ... --vqgan "
                "<Meta Chameleon tokenizer dir>` so the folder holds the full image tokenizer."
            )

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        f = self.downsample_factor
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.config.in_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        h, w = pixel_values.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image size {w}x{h} (WxH) is not divisible by the VQGAN factor {f}: resize or crop to a multiple "
                f"of {f} (the image processor does this with its buckets)."
            )

    @torch.no_grad()
    def encode_to_codes(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        self._check_pixels(pixel_values)
        self._require("encoder")
        b, _, h, w = pixel_values.shape
        f = self.downsample_factor
        hidden = self.quant_conv(self.encoder(pixel_values.to(self.quant_conv.weight.dtype)))
        _, _, indices = self.quantize(hidden)
        return indices.view(b, h // f, w // f)

    def codes_to_latents(self, codes: torch.LongTensor) -> torch.Tensor:
        if codes.ndim != 3:
            raise ValueError(f"codes must have shape (batch, rows, cols), got {tuple(codes.shape)}.")
        n = self.config.num_embeddings
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
            raise ValueError(f"codes must lie in 0..{n - 1} (the codebook size), got {int(codes.min())}..{int(codes.max())}.")
        return self.quantize.embedding(codes).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def decode_codes(self, codes: torch.LongTensor) -> torch.Tensor:
        self._require("decoder")
        from .offload import execution_device  # the codebook's weight sits on "meta" under CPU offload

        latents = self.codes_to_latents(codes.to(execution_device(self.quantize.embedding)))
        return self.decoder(self.post_quant_conv(latents))


__all__ = ["LuminaMGPTVQGAN", "LuminaMGPTVQDecoder"]
