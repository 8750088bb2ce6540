"""`lumina-hf train --config RECIPE.yaml [--dry_run] [--check_data] [--key value ...] [--set key=value ...]`.

Any recipe key can be overridden on the command line (`--learning_rate 1e-4 --output_dir x`, `--key=value`,
`--set key=value`, a bare `--flag` is true, `--no_flag` false); overrides win over the YAML. The same parser backs
`python -m lumina_hf.train` / `accelerate launch -m lumina_hf.train`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import CommandError

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Fine-tune Lumina-mGPT with a recipe (TRL SFTTrainer on pre-tokenized data: full fine-tuning or LoRA). "
    "Recipe keys can be overridden: --learning_rate 1e-4, --output_dir=x, --set lora_r=16."
)


class _RecipeArgumentParser(argparse.ArgumentParser):
    """Collects the options it does not define (recipe overrides such as `--learning_rate 1e-4`) into `overrides`
    instead of rejecting them, so any recipe key can be set without declaring every field as an option."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + list(extras)
        return namespace, []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (recipes/<model>/<stage>/config_*.yaml)")
    parser.add_argument(
        "--dry_run",
        "--dry-run",
        action="store_true",
        help="parse the recipe and build the SFTConfig and PEFT config without loading the model or training",
    )
    parser.add_argument(
        "--check_data",
        "--check-data",
        action="store_true",
        help="with --dry_run: fail when a local dataset folder of the mixture does not exist",
    )
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")


def build_parser(prog: str = "lumina_hf.train") -> argparse.ArgumentParser:
    parser = _RecipeArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def run(args) -> int:
    """Parse the recipe named by `args` (a namespace from the parser above) and train or dry-run it."""
    from ..training.arguments import parse_recipe
    from ..training.runner import run_recipe

    overrides = list(getattr(args, "overrides", None) or [])
    for item in getattr(args, "set_values", None) or []:
        overrides += ["--set", item]
    if getattr(args, "check_data", False):
        overrides += ["--check_data", "true"]
    if not args.config and not overrides:
        raise CommandError("give --config RECIPE.yaml (and optional overrides).")
    recipe = parse_recipe(args.config, overrides)
    result = run_recipe(recipe, dry_run=args.dry_run)
    if result.dry_run:
        sys.stdout.write(_summary(recipe) + "\n")
    elif result.is_main_process:  # one line per launch, not one per rank
        written = [p for p in (result.pipeline_dir, result.adapter_dir) if p]
        sys.stdout.write(f"trained {args.config or 'recipe'}: {', '.join(written)}\n")
    return 0


def _summary(recipe) -> str:
    t = recipe.training
    mode = f"LoRA r={recipe.lora.lora_r}" if recipe.lora.use_peft else "full fine-tuning"
    data = ", ".join(f"{e['path']} x{e['weight']:g}" for e in recipe.data.dataset_mixture)
    return (
        f"dry run OK: {recipe.source or 'recipe'}\n"
        f"  model {recipe.model.model_name_or_path} ({mode}), output_dir {t.output_dir}\n"
        f"  data {data}; max_length {t.max_length}, target_size {recipe.data.target_size}\n"
        f"  lr {t.learning_rate:g} ({getattr(t.lr_scheduler_type, 'value', t.lr_scheduler_type)}, warmup {t.warmup_steps:g}), batch {t.per_device_train_batch_size}"
        f" x accumulation {t.gradient_accumulation_steps}, epochs {t.num_train_epochs:g}, max_steps {t.max_steps},"
        f" z-loss {t.z_loss_weight:g}, bf16 {t.bf16}"
    )


def register(subparsers) -> None:
    """Add `lumina-hf train` to the `lumina-hf` command line."""
    parser = subparsers.add_parser("train", help="fine-tune with a recipe (full or LoRA)", description=DESCRIPTION)
    # unknown options are recipe overrides, not errors (see _RecipeArgumentParser)
    parser.__class__ = _RecipeArgumentParser
    add_arguments(parser)
    parser.set_defaults(func=run)


__all__ = ["register", "build_parser", "run"]
