"""Training: raw data -> tokenized `datasets` (images VQ-encoded once, offline), trainer, recipes."""

from .arguments import (
    DataArguments,
    LoraArguments,
    LuminaTrainingArguments,
    ModelArguments,
    Recipe,
    parse_recipe,
    recipe_keys,
)
from .chunks import OUTPUT_COLUMNS, output_features
from .collator import LuminaMGPTDataCollator
from .items import SKIP_REASONS, minimum_max_length
from .mixture import build_datasets, synthetic_dataset
from .runner import TrainingResult, build_peft_config, build_trainer, run_recipe
from .tokenize import TokenizeResult, tokenize_dataset
from .trainer import LuminaSFTTrainer, chunked_lm_loss
from .vq import VQImageEncoder, load_vq_model

__all__ = [
    "OUTPUT_COLUMNS",
    "SKIP_REASONS",
    "TokenizeResult",
    "VQImageEncoder",
    "load_vq_model",
    "minimum_max_length",
    "output_features",
    "tokenize_dataset",
    "DataArguments",
    "LoraArguments",
    "LuminaMGPTDataCollator",
    "LuminaSFTTrainer",
    "LuminaTrainingArguments",
    "ModelArguments",
    "Recipe",
    "TrainingResult",
    "build_datasets",
    "build_peft_config",
    "build_trainer",
    "chunked_lm_loss",
    "parse_recipe",
    "recipe_keys",
    "run_recipe",
    "synthetic_dataset",
]
