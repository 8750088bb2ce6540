"""`lumina-hf tokenize`: raw data -> a tokenized training dataset (see `lumina_hf.training.data`)."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    t = subparsers.add_parser(
        "tokenize",
        help="tokenize an image-caption folder, a training JSON or a dataset (images VQ-encoded once) for training",
        description=(
            "Turn raw data into a `datasets` dataset of input_ids / labels / length, saved with save_to_disk. "
            "Resumable: rerun the same command after an interruption."
        ),
    )
    t.add_argument(
        "source",
        help="an image folder with metadata.jsonl/csv/parquet (file_name + caption column), a training .json/.jsonl "
        "(conversations + image paths), or a folder written by Dataset.save_to_disk",
    )
    t.add_argument("-o", "--output", required=True, help="output folder (the dataset and tokenize_report.json)")
    t.add_argument(
        "--model",
        required=True,
        help="a lumina_hf model folder (only its VQGAN is loaded); 'tiny-random' uses the random tiny model (tests, timing)",
    )
    t.add_argument("--processor", default=None, help="processor folder (default: the --model folder)")
    t.add_argument("--target-size", type=int, default=None, help="bucket family: 512, 768 or 1024 (default: the processor's)")
    t.add_argument("--max-length", type=int, default=4096, help="longer items are skipped, never cut (default 4096)")
    t.add_argument("--image-column", default="image")
    t.add_argument("--caption-column", default="text")
    t.add_argument("--conversation-column", default=None, help="read a dataset's conversations/messages from this column")
    t.add_argument("--split", default="train", help="split of a saved DatasetDict (default train)")
    t.add_argument("--no-size-ratio", type=float, default=0.0, help="share of text-to-image prompts without WxH")
    t.add_argument(
        "--uncond-ratio", type=float, default=0.0, help="share of single-image items kept as the image alone (2.0 uses 0.1)"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--random-crop", action="store_true", help="seeded random crop instead of the centre crop")
    t.add_argument("--chunk-size", type=int, default=256, help="items per resumable chunk")
    t.add_argument("--batch-size", type=int, default=8, help="images per VQGAN forward")
    t.add_argument("--num-workers", type=int, default=None, help="image-decoding threads (default: up to 8)")
    t.add_argument("--device", default=None, help="where the VQGAN runs (default: cuda when available)")
    t.add_argument("--no-source-index", action="store_true", help="leave out the source_index column")
    t.add_argument("--overwrite", action="store_true", help="replace an existing dataset (or chunks made with other settings)")
    t.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the result with Dataset.push_to_hub")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.data import tokenize_dataset
    from .generate import TINY_RANDOM

    processor = args.processor
    vq_model = args.model
    if args.model == TINY_RANDOM:
        from ..testing_utils import build_tiny_model, build_tiny_processor

        logger.warning("Using the randomly initialised tiny model: the tokens are valid but meaningless (tests, timing).")
        vq_model = build_tiny_model()
        if processor is None:
            processor = build_tiny_processor(args.target_size or 256)
    dataset, report = tokenize_dataset(
        args.source,
        args.output,
        vq_model=vq_model,
        processor=processor,
        target_size=args.target_size,
        max_length=args.max_length,
        image_column=args.image_column,
        caption_column=args.caption_column,
        conversation_column=args.conversation_column,
        split=args.split,
        no_size_ratio=args.no_size_ratio,
        uncond_ratio=args.uncond_ratio,
        seed=args.seed,
        random_crop=args.random_crop,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        keep_source_index=not args.no_source_index,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        push_to_hub=args.push_to_hub,
    )
    skipped = ", ".join(f"{r} {c}" for r, c in report["skipped"].items()) or "none"
    rate = report.get("items_per_second")
    sys.stdout.write(
        f"{args.output}: {report['num_written']} of {report['num_source_items']} items written, "
        f"{report['num_tokens']} tokens; skipped: {skipped}; "
        f"{report['items_this_run']} items this run in {report['seconds_this_run']:.1f} s"
        + (f" ({rate:.1f} items/s on {report['device']})" if rate else "")
        + "\n"
    )
    return 0
