"""`LuminaSFTTrainer`: TRL's `SFTTrainer` with the Lumina-mGPT loss (cross-entropy + z-loss, chunked LM head).

How the loss is computed (and why not through TRL's fused LM head): TRL 1.16 patches the model's forward with a fused
LM head that returns per-token log-probabilities only; the log-sum-exp that z-loss needs (Lumina-mGPT's recipe:
`weight * mean(logsumexp(shift_logits)^2)` over positions whose label is >= 0) cannot be recovered from its outputs,
and the model's own `forward` (which can add z-loss) is bypassed. So `compute_loss` turns the fused path off: it runs
the model through the (DDP/FSDP/PEFT-wrapped) module with `logits_to_keep=1`, so no full-vocabulary logits are built,
takes the final hidden states from a forward hook on the decoder, and computes cross-entropy and z-loss itself from
the logits of `loss_chunk_size` trained positions at a time (a custom autograd function recomputes each chunk's logits
in backward, so they are never held for the whole batch). The model's own `config.z_loss_weight` is set to 0 for the
duration of training so z-loss is never counted twice; the recipe's `z_loss_weight` is applied here. Under DeepSpeed
ZeRO-3 (the LM head weight only exists inside its module's forward) the same sums come from the model's full logits.

Both terms are divided by the number of trained tokens of the whole (gradient-accumulated, all-device) batch, like
the cross-entropy of `transformers.Trainer`, so the z-loss is the mean over every trained position of the batch.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import SFTTrainer

logger = logging.getLogger(__name__)

SIGNATURE_FILE = "lumina_training_signature.json"
_SIGNATURE_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class _ChunkLMHeadLoss(torch.autograd.Function):
    """Per-token `(nll, lse)` of one chunk of positions, `nll = lse - logit[label]`, without keeping the
    `(chunk, vocab)` logits for backward: they are recomputed there, and the gradient of both outputs is formed in one
    pass, `dlogits = softmax * (g_nll + g_lse) - onehot(label) * g_nll`. Matmuls run in the dtype the forward used
    (the autocast dtype under mixed precision); the softmax math is fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        logits = F.linear(hidden, weight)
        ctx.compute_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lse = torch.logsumexp(logits, dim=-1)
        nll = lse - logits.gather(-1, labels[:, None]).squeeze(-1)
        hit = logits.argmax(-1) == labels
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.mark_non_differentiable(hit)
        return nll, lse, hit

    @staticmethod
    def backward(ctx, grad_nll, grad_lse, _grad_hit):
        hidden, weight, labels, lse = ctx.saved_tensors
        cd = ctx.compute_dtype
        h, w = hidden.to(cd), weight.to(cd)
        grad_nll = torch.zeros_like(lse) if grad_nll is None else grad_nll.to(lse.dtype)
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
        probs = F.linear(h, w).to(lse.dtype).sub_(lse[:, None]).exp_()
        grad_logits = probs.mul_((grad_nll + grad_lse)[:, None])
        grad_logits.scatter_add_(1, labels[:, None], -grad_nll[:, None])
        grad_logits = grad_logits.to(cd)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ w).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.t() @ h).to(weight.dtype)
        return grad_hidden, grad_weight, None


def chunked_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.LongTensor,
    chunk_size: int = 4096,
) -> dict[str, torch.Tensor]:
    """Sums of the shifted cross-entropy and of `logsumexp(logits)^2` over the positions whose label is >= 0.

    `hidden_states` `(batch, seq, hidden)` are the decoder's final (normed) states, `weight` the LM head `(vocab,
    hidden)`, `labels` `(batch, seq)` unshifted. Logits are built `chunk_size` trained positions at a time and
    recomputed in backward, so at most one chunk of `(chunk_size, vocab)` fp32 logits is alive at once.
    Returns `nll_sum`, `z_sum` (differentiable), `num_tokens`, `num_correct`."""
    h = hidden_states[:, :-1]
    y = labels[:, 1:].to(h.device)
    keep = y >= 0
    h = h[keep]
    y = y[keep]
    n = y.numel()
    if n == 0:
        zero = hidden_states.sum() * 0.0 + weight.sum() * 0.0
        return {"nll_sum": zero, "z_sum": zero, "num_tokens": torch.zeros((), device=h.device), "num_correct": torch.zeros((), device=h.device)}
    nll_sum = z_sum = None
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    for start in range(0, n, chunk_size):
        nll, lse, hit = _ChunkLMHeadLoss.apply(h[start : start + chunk_size], weight, y[start : start + chunk_size])
        part_nll, part_z = nll.sum(), (lse * lse).sum()
        nll_sum = part_nll if nll_sum is None else nll_sum + part_nll
        z_sum = part_z if z_sum is None else z_sum + part_z
        correct = correct + hit.sum()
    return {"nll_sum": nll_sum, "z_sum": z_sum, "num_tokens": torch.tensor(float(n), device=h.device), "num_correct": correct}


def full_logits_lm_loss(logits: torch.Tensor, labels: torch.LongTensor) -> dict[str, torch.Tensor]:
    """The sums of `chunked_lm_loss` from logits the model already built `(batch, seq, vocab)` (the DeepSpeed
    ZeRO-3 path, where the LM head weight is only available inside the model's forward)."""
    shift = logits[:, :-1]
    y = labels[:, 1:].to(logits.device)
    keep = y >= 0
    rows = shift[keep].float()
    target = y[keep]
    lse = torch.logsumexp(rows, dim=-1)
    nll = lse - rows.gather(-1, target[:, None]).squeeze(-1)
    return {
        "nll_sum": nll.sum() if target.numel() else logits.sum() * 0.0,
        "z_sum": (lse * lse).sum() if target.numel() else logits.sum() * 0.0,
        "num_tokens": torch.tensor(float(target.numel()), device=logits.device),
        "num_correct": (rows.argmax(-1) == target).sum(),
    }


def fused_lm_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.LongTensor, z_loss_weight: float):
    """The sums of `chunked_lm_loss` from liger-kernel's fused linear cross-entropy (CUDA): the logits are never
    materialised, and its `lse_square_scale` is exactly our z-loss weight. Liger returns one differentiable sum,
    `nll + weight * lse^2`, and the z term detached; `nll_sum` is returned as that sum minus the detached z term, so
    `nll_sum + weight * z_sum` has liger's value and gradient. Token accuracy is not computed (None)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    y = labels[:, 1:].to(h.device).reshape(-1)
    n = int((y >= 0).sum())
    total, z_scaled = liger_fused_linear_cross_entropy(
        h, weight, y, ignore_index=-100, lse_square_scale=float(z_loss_weight), reduction="sum", return_z_loss=True,
    )
    z_scaled = z_scaled.detach().float()
    z_sum = z_scaled / z_loss_weight if z_loss_weight else torch.zeros((), device=h.device)
    return {"nll_sum": total.float() - z_scaled, "z_sum": z_sum, "num_tokens": torch.tensor(float(n), device=h.device),
            "num_correct": None}


def liger_available() -> bool:
    """liger-kernel's fused loss can run: it is installed and CUDA (Triton) is there."""
    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


def _unwrap_peft(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The LM head weight as a plain tensor (FSDP2 exposes sharded parameters as DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return weight
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def model_signature(model, use_peft: bool | None = None, lora_r: int | None = None) -> dict:
    """What a checkpoint must match to be resumed into `model`: the architecture sizes and the tuning mode."""
    cfg = _unwrap_peft(model).config
    sig = {k: getattr(cfg, k, None) for k in _SIGNATURE_CONFIG_KEYS}
    if use_peft is not None:
        sig["use_peft"] = bool(use_peft)
    if use_peft and lora_r is not None:
        sig["lora_r"] = int(lora_r)
    return sig


class SignatureCallback(TrainerCallback):
    """Writes `lumina_training_signature.json` into every checkpoint once the Trainer has finished saving it: a resume
    checks that the checkpoint belongs to this model, and takes only checkpoints that have it (complete ones)."""

    def __init__(self, signature: dict):
        self.signature = dict(signature)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                # written last, and atomically: its presence marks the checkpoint complete for a later resume
                tmp = os.path.join(folder, f".{SIGNATURE_FILE}.tmp")
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(self.signature, fh, indent=2)
                os.replace(tmp, os.path.join(folder, SIGNATURE_FILE))
        return control


def checkpoint_signature(folder: str) -> dict | None:
    """The signature of a checkpoint folder: ours if written, else read from its `config.json`, else None."""
    path = os.path.join(folder, SIGNATURE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as fh:
            cfg = json.load(fh)
        sig = {k: cfg.get(k) for k in _SIGNATURE_CONFIG_KEYS if k in cfg}
        sig["use_peft"] = False
        return sig
    return None


def check_resume_checkpoint(folder: str, expected: dict) -> None:
    """ValueError when `folder` is not a checkpoint of this model (other architecture sizes or tuning mode)."""
    if not os.path.isdir(folder):
        raise ValueError(f"resume_from_checkpoint={folder!r} is not a folder.")
    if not os.path.isfile(os.path.join(folder, "trainer_state.json")):
        raise ValueError(
            f"{folder} is not a Trainer checkpoint (no trainer_state.json): resume from an output_dir/checkpoint-N folder."
        )
    found = checkpoint_signature(folder)
    if found is None:
        raise ValueError(
            f"{folder} has neither {SIGNATURE_FILE} nor config.json: cannot tell which model it belongs to, so it is not "
            "resumed. Start a new run or point at a checkpoint written by `lumina-hf train`."
        )
    diffs = [
        f"{k}: checkpoint {found[k]!r} vs model {expected[k]!r}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {folder} belongs to another model or training mode ({'; '.join(diffs)}): resuming it would "
            "load mismatched weights. Use the model and recipe it was trained with, or start from scratch."
        )


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """A random order in which consecutive runs of `batch_size` items have similar lengths: a random permutation cut
    into megabatches (50 batches, or a quarter of the data when that is fewer), each sorted longest first, with
    the longest item of all moved to the front so that an out-of-memory error shows in the first step. This is the
    order of transformers' `LengthGroupedSampler`, written here because transformers keeps it out of its public API
    and draws it from the global RNG."""
    n = len(lengths)
    per_mega = max(1, min(n // (batch_size * 4), 50)) * batch_size
    order = torch.randperm(n, generator=generator).tolist()
    megabatches = [sorted(order[i : i + per_mega], key=lambda k: lengths[k], reverse=True) for i in range(0, n, per_mega)]
    if megabatches:
        longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])
        megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [k for mega in megabatches for k in mega]


class EpochSeededLengthGroupedSampler(Sampler):
    """Length-grouped batches (`length_grouped_order`) in an order that depends only on `seed` and the epoch
    (`set_epoch`, called by the Trainer), not on the global RNG state: the same on every rank, and the same after
    resuming from a checkpoint in the middle of an epoch."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int = 0):
        self.batch_size = int(batch_size)
        self.lengths = list(lengths)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(length_grouped_order(self.lengths, self.batch_size, generator))


class _KeepSpecialTokens(TrainerCallback):
    """`Trainer.train` aligns the model's bos/eos/pad ids with the tokenizer's. Lumina's turn separator 8710 is its
    eos (`</s>` = 2 does not stop generation in Lumina-mGPT), so the alignment would write eos 2 into the config
    of every checkpoint and of the final model: put the model's own ids back as soon as training begins."""

    _KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

    def __init__(self, model):
        self.targets = [c for c in (model.config, getattr(model, "generation_config", None)) if c is not None]
        self.saved = [{k: getattr(c, k, None) for k in self._KEYS} for c in self.targets]

    def on_train_begin(self, args, state, control, **kwargs):
        changed = []
        for cfg, values in zip(self.targets, self.saved):
            for key, value in values.items():
                if getattr(cfg, key, None) != value:
                    changed.append(f"{key}={value}")
                setattr(cfg, key, value)
        if changed:
            logger.info(
                "kept the model's own special token ids (%s) over the tokenizer's: Lumina-mGPT stops at 8710, not </s>.",
                ", ".join(sorted(set(changed))),
            )
        return control


class LuminaSFTTrainer(SFTTrainer):
    """`SFTTrainer` for pre-tokenized Lumina-mGPT data: cross-entropy + z-loss from a chunked LM head (see the module
    docstring), weight decay only on weight matrices (not on norms, embeddings or biases), and a frozen VQGAN.

    The recipe's `z_loss_weight` and `loss_chunk_size` come from `args` (`LuminaTrainingArguments`); plain
    `SFTConfig` args give z-loss 0 and chunks of 4096 tokens. After each `compute_loss`, `last_loss_parts` holds the
    detached `loss`, `ce` and `z_loss` (the unweighted mean of `logsumexp^2`) of that micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.z_loss_weight = float(getattr(self.args, "z_loss_weight", 0.0) or 0.0)
        self.loss_chunk_size = int(getattr(self.args, "loss_chunk_size", 4096) or 4096)
        base = _unwrap_peft(self.model)
        # The model's own forward z-loss is not used here (compute_loss applies the recipe's weight): keep it off so
        # it can never be added twice; `restore_model_config()` puts the original value back before saving.
        self._saved_model_z_loss_weight = getattr(base.config, "z_loss_weight", 0.0)
        base.config.z_loss_weight = 0.0
        vq = getattr(getattr(base, "model", None), "vqmodel", None)
        if vq is not None:
            vq.requires_grad_(False)
        if getattr(base.config, "mask_image_logits", False):
            logger.warning(
                "the model config has mask_image_logits=True (stock Chameleon): its forward hides image logits, but the "
                "training loss uses the unmasked LM head, so image tokens are trained. Set mask_image_logits=False for "
                "a Lumina-mGPT model that generates images."
            )
        self.add_callback(_KeepSpecialTokens(base))
        # DeepSpeed ZeRO-3 partitions lm_head.weight outside its module's forward, so the chunked loss (which reads
        # the weight directly) cannot run there: the model builds the full logits instead (more memory).
        self.full_logits_loss = bool(self.is_deepspeed_enabled and is_deepspeed_zero3_enabled())
        if self.full_logits_loss:
            logger.warning("DeepSpeed ZeRO-3: the loss is computed from the model's full logits (use fsdp2 for the chunked loss).")
        # on CUDA with liger-kernel installed (`pip install "lumina-hf[cuda]"`), the fused loss replaces the chunked one
        self.fused_loss = bool(getattr(self.args, "use_liger_loss", True)) and not self.full_logits_loss and liger_available()
        if self.fused_loss:
            logger.info("training loss: liger-kernel fused linear cross-entropy with z-loss (lse_square_scale)")
        # compute_loss normalises by `num_items_in_batch` itself (gradient accumulation handled).
        self.model_accepts_loss_kwargs = True
        self.last_loss_parts: dict[str, float] = {}
        # per-mode running values of our own metrics, averaged into the next `log` call
        self.loss_metrics: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        self.train_tokens_seen = 0

    def restore_model_config(self) -> None:
        """Undo the training-time changes to the model: its own z-loss weight and TRL's fused-head forward patch."""
        base = _unwrap_peft(self.accelerator.unwrap_model(self.model))
        base.config.z_loss_weight = self._saved_model_z_loss_weight
        # TRL installs its fused LM head as an instance attribute `forward`; drop it so the class forward is used.
        base.__dict__.pop("forward", None)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means of z-loss, token accuracy (and the train token count) since the last log to `logs`."""
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self.loss_metrics[mode].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self.loss_metrics[mode] = {}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ data order
    # `_get_train_sampler` is the Trainer's sampler hook (TRL's own trainers override it the same way); the only
    # public alternative would be rebuilding the whole training DataLoader.
    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        column = self.args.length_column_name
        if (
            self.args.train_sampling_strategy == "group_by_length"
            and hasattr(dataset, "column_names")
            and column in dataset.column_names
        ):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            lengths = [int(n) for n in dataset[column]]
            return EpochSeededLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths, seed=seed
            )
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ optimizer
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on weight matrices only: not on biases, norms (RMSNorm, the grouped q/k LayerNorm) or
        embeddings (the original training code decays them too; we do not)."""
        skip: set[str] = set()
        for mod_name, module in model.named_modules():
            is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")
            if is_norm or isinstance(module, nn.Embedding):
                for p_name, _ in module.named_parameters(recurse=False):
                    skip.add(f"{mod_name}.{p_name}" if mod_name else p_name)
        names = []
        for name, param in model.named_parameters():
            if name in skip or param.ndim < 2 or name.endswith("bias"):
                continue
            names.append(name)
        return names

    # ------------------------------------------------------------------ loss
    def _backbone_and_head(self, model):
        base = _unwrap_peft(self.accelerator.unwrap_model(model))
        return base.model, base.get_output_embeddings()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        forward_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        if self.full_logits_loss:
            outputs = model(**forward_inputs, use_cache=False)
            parts = full_logits_lm_loss(outputs.logits, labels)
        else:
            backbone, head = self._backbone_and_head(model)
            captured: dict[str, torch.Tensor] = {}

            def _capture(module, args, output):
                captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

            handle = backbone.register_forward_hook(_capture)
            try:
                # logits_to_keep=1: the model builds the logits of the last position only; the loss is computed below
                outputs = model(**forward_inputs, use_cache=False, logits_to_keep=1)
            finally:
                handle.remove()
            hidden = captured.pop("hidden")
            weight = _full_weight(head.weight)  # with PEFT trainable image rows: the merged (base + trained rows) tensor
            if self.fused_loss and hidden.is_cuda:
                parts = fused_lm_loss(hidden, weight, labels, self.z_loss_weight)
            else:
                parts = chunked_lm_loss(hidden, weight, labels, self.loss_chunk_size)
        n_local = parts["num_tokens"]
        denom = torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else n_local, device=n_local.device)
        denom = denom.to(torch.float32).clamp(min=1)
        ce = parts["nll_sum"] / denom
        z = parts["z_sum"] / denom
        loss = ce + self.z_loss_weight * z if self.z_loss_weight else ce
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # like Trainer.compute_loss: the token count spans all ranks and DDP/FSDP average the gradients
            loss = loss * self.accelerator.num_processes

        with torch.no_grad():
            n = n_local.clamp(min=1)
            self.last_loss_parts = {
                "loss": float(loss.detach()),
                "ce": float(ce.detach()),
                "z_loss": float(parts["z_sum"].detach() / n),
            }
            correct = parts["num_correct"]
            gathered = self.accelerator.gather_for_metrics(torch.stack([
                parts["z_sum"].detach().float(), n_local.float(),
                correct.float() if correct is not None else torch.zeros((), device=n_local.device),
            ])[None]).sum(0)
            valid = float(gathered[1])
            metrics = self.loss_metrics[mode]
            metrics.setdefault("z_loss", []).append(float(gathered[0]) / valid if valid else 0.0)
            if correct is not None:  # the fused loss does not compute it
                metrics.setdefault("mean_token_accuracy", []).append(float(gathered[2]) / valid if valid else 0.0)
            if mode == "train" and "attention_mask" in inputs:
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()[None]).sum().item()
                self.train_tokens_seen += int(tokens)
            metrics["num_tokens"] = [float(self.train_tokens_seen)]
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "EpochSeededLengthGroupedSampler",
    "length_grouped_order",
    "LuminaSFTTrainer",
    "SIGNATURE_FILE",
    "SignatureCallback",
    "check_resume_checkpoint",
    "checkpoint_signature",
    "chunked_lm_loss",
    "full_logits_lm_loss",
    "model_signature",
]
