"""Offline tokenization, by its former single-module name: the names that `lumina_hf.training.data` has always
exported, now defined in `sources` (raw data as `datasets`), `items` (one row -> one item), `vq` (images -> codes),
`identity` (what a tokenization was made from), `chunks` (resumable chunks on disk) and `tokenize` (the run)."""

from .chunks import OUTPUT_COLUMNS, output_features
from .items import SKIP_REASONS, minimum_max_length
from .items import with_target_size as _with_target_size  # noqa: F401  (the recipe runner imports it from here)
from .tokenize import TokenizeResult, tokenize_dataset
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
]
