"""Train a (small) Chameleon-layout VQGAN from scratch: what the nano model's image tokenizer is made with.

The published models use Meta's VQGAN; a new small model needs its own. This trainer keeps the taming
layout of `LuminaMGPTVQGAN` (factor 16) and trains it with an L1 + MSE reconstruction loss plus the
quantizer's codebook/commitment loss, restarting dead codes from encoder outputs (no GAN: the nano data
are flat-colored shapes). Run it with `python -m examples.nano.train_vqgan --config recipes/nano/vqgan.yaml`.
"""

import dataclasses
import logging
import math
import os
import random
import shutil
import tempfile

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from lumina_hf.configuration_lumina_mgpt import LuminaMGPTVQConfig
from lumina_hf.image_processing_lumina_mgpt import pil_to_tensor
from lumina_hf.modeling_vqgan import LuminaMGPTVQGAN

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VQGANTrainingConfig:
    output_dir: str
    data: str = "shapes"  # the synthetic shapes of examples/nano/shapes.py
    target_sizes: list[int] = dataclasses.field(default_factory=lambda: [64, 96])
    num_embeddings: int = 512
    embed_dim: int = 32
    latent_channels: int = 32
    base_channels: int = 32
    channel_multiplier: list[int] = dataclasses.field(default_factory=lambda: [1, 1, 1, 2, 2])
    num_res_blocks: int = 1
    steps: int = 1500
    batch_size: int = 16
    learning_rate: float = 5e-4
    mse_weight: float = 1.0
    restart_dead_codes_every: int = 25
    restart_dead_codes_until: float = 1.0  # fraction of the steps after which codes are no longer restarted
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine" (to min_lr_ratio * learning_rate after the warmup)
    min_lr_ratio: float = 0.05
    bf16: bool = False  # bf16 autocast for the convolutions (CPUs with AVX512-BF16/AMX: ~3x faster); quantizer fp32
    init_from: str | None = None  # a saved VQGAN folder to continue from (same architecture)
    # "all", or "decoder": only post_quant_conv + decoder learn; the encoder and the codebook stay frozen, so
    # every image keeps its codes and a language model trained on them needs no retraining
    train_parts: str = "all"
    save_every: int = 0  # also save `<output_dir>-checkpoints/step-N` every N steps (0: only the final model)
    seed: int = 0
    threads: int | None = None

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "VQGANTrainingConfig":
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known keys: {sorted(known)}.")
        if "output_dir" not in raw:
            raise ValueError(f"{path}: `output_dir` is required.")
        cfg = cls(**raw)
        if cfg.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"{path}: lr_schedule={cfg.lr_schedule!r}; use 'constant' or 'cosine'.")
        return cfg

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warmup, then constant or cosine decay."""
        if step < self.lr_warmup_steps:
            return self.learning_rate * (step + 1) / self.lr_warmup_steps
        if self.lr_schedule == "constant":
            return self.learning_rate
        progress = (step - self.lr_warmup_steps) / max(1, self.steps - self.lr_warmup_steps)
        floor = self.min_lr_ratio * self.learning_rate
        return floor + (self.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def vq_config(self) -> LuminaMGPTVQConfig:
        return LuminaMGPTVQConfig(
            embed_dim=self.embed_dim,
            num_embeddings=self.num_embeddings,
            latent_channels=self.latent_channels,
            base_channels=self.base_channels,
            channel_multiplier=list(self.channel_multiplier),
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=[],
            resolution=max(self.target_sizes),
        )


def _shape_batches(cfg: VQGANTrainingConfig):
    """Endless batches of shape images; each batch shares one (size, aspect) so it stacks."""
    from .shapes import ASPECTS, make_item

    rng = random.Random(cfg.seed)
    index = 0
    while True:
        target = rng.choice(cfg.target_sizes)
        aspect = rng.choice(ASPECTS)
        images = []
        for _ in range(cfg.batch_size):
            item = make_item(index, seed=cfg.seed + 1000, target_size=target, aspects=(aspect,))
            images.append(pil_to_tensor(item.image))
            index += 1
        yield torch.stack(images)


@torch.no_grad()
def _reseed_codes(model, z: torch.Tensor, codes: torch.Tensor) -> None:
    """Set codebook entries `codes` to randomly picked encoder outputs from `z` (plus a little noise)."""
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = flat[torch.randint(0, flat.shape[0], (len(codes),))]
    model.quantize.embedding.weight[codes] = pick + 0.01 * pick.std() * torch.randn_like(pick)


def _save_atomic(model, cfg: VQGANTrainingConfig, out: str) -> None:
    """Save the model and its training config to `out` through a temp folder renamed into place."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".vqgan-", dir=parent)
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_config.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(dataclasses.asdict(cfg), fh)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def train_vqgan(cfg: VQGANTrainingConfig, progress: bool = True) -> str:
    """Train and save to `cfg.output_dir` (written to a temp folder first, then renamed). Returns the path."""
    if cfg.data != "shapes":
        raise ValueError(f"data={cfg.data!r}: only the synthetic 'shapes' data is supported by this trainer.")
    from .shapes import ASPECTS, aspect_size

    for t in cfg.target_sizes:
        sizes = [aspect_size(a, t) for a in ASPECTS]
        if any(w % 16 or h % 16 for w, h in sizes):
            raise ValueError(f"target size {t} gives image sizes {sizes}: every side must be a multiple of 16 (use 48, 64, 96...).")
    if cfg.train_parts not in ("all", "decoder"):
        raise ValueError(f"train_parts={cfg.train_parts!r}; use 'all' or 'decoder'.")
    if cfg.train_parts == "decoder" and not cfg.init_from:
        raise ValueError("train_parts='decoder' refines a trained VQGAN: set init_from to its folder.")
    if os.path.exists(cfg.output_dir):
        raise ValueError(f"{cfg.output_dir} exists: choose a new output_dir or remove it.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = LuminaMGPTVQGAN.from_pretrained(cfg.init_from).train()
        want, got = cfg.vq_config(), model.config
        diff = [k for k in ("embed_dim", "num_embeddings", "latent_channels", "base_channels", "channel_multiplier",
                            "num_res_blocks") if getattr(want, k) != getattr(got, k)]
        if diff:
            raise ValueError(f"init_from={cfg.init_from}: its {diff} differ from this config; copy them from "
                             f"{os.path.join(cfg.init_from, 'config.json')}.")
    else:
        model = LuminaMGPTVQGAN(cfg.vq_config()).train()
        # PyTorch's default (fan-in scaled) conv init trains this conv net faster than transformers' N(0, 0.02)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.reset_parameters()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    decoder_only = cfg.train_parts == "decoder"
    if decoder_only:
        for module in (model.encoder, model.quant_conv, model.quantize):
            module.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=cfg.learning_rate, betas=(0.5, 0.9))
    usage = torch.zeros(cfg.num_embeddings)
    batches = _shape_batches(cfg)
    bar = tqdm(range(cfg.steps), desc="vqgan", disable=not progress)
    restart_until = int(cfg.restart_dead_codes_until * cfg.steps)
    rec_sum, rec_n = 0.0, 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        x = next(batches).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.bf16), torch.set_grad_enabled(not decoder_only):
            z = model.quant_conv(model.encoder(x))
        z = z.float()  # nearest-code search and codebook losses in fp32
        if step == 0 and not cfg.init_from:
            # data-dependent codebook init: random encoder outputs (a random N(0, 0.02) codebook would put
            # every latent on one code and leave the decoder nothing to learn from)
            _reseed_codes(model, z, torch.arange(cfg.num_embeddings))
        zq, vq_loss, idx = model.quantize(z)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.bf16):
            rec = model.decoder(model.post_quant_conv(zq))
        rec = rec.float()
        rec_loss = (rec - x).abs().mean() + cfg.mse_weight * F.mse_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(idx.detach().cpu(), minlength=cfg.num_embeddings).float()
        rec_sum, rec_n = rec_sum + rec_loss.item(), rec_n + 1
        if cfg.restart_dead_codes_every and (step + 1) % cfg.restart_dead_codes_every == 0:
            dead = (usage == 0).nonzero().flatten()
            if len(dead) and step < restart_until and not decoder_only:
                _reseed_codes(model, z, dead)
            logger.info("step %d: mean rec %.4f, vq %.4f, %d/%d codes used, lr %.2e", step + 1, rec_sum / rec_n,
                        vq_loss.item(), int((usage > 0).sum()), cfg.num_embeddings, cfg.lr_at(step))
            usage.zero_()
            rec_sum, rec_n = 0.0, 0
        bar.set_postfix(rec=f"{rec_loss.item():.4f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save_atomic(model, cfg, os.path.join(f"{cfg.output_dir}-checkpoints", f"step-{step + 1}"))
    model.eval()
    _save_atomic(model.cpu(), cfg, cfg.output_dir)
    return cfg.output_dir


__all__ = ["VQGANTrainingConfig", "train_vqgan"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m examples.nano.train_vqgan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML with VQGANTrainingConfig fields")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train_vqgan(VQGANTrainingConfig.from_yaml(args.config, output_dir=args.output_dir, steps=args.steps))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
