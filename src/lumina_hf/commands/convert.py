"""`lumina-hf convert`: a published Lumina-mGPT checkpoint + Meta's VQGAN -> one lumina_hf pipeline folder."""

import sys

from ..conversion.sources import DTYPES
from ..convert_lumina_mgpt import convert_checkpoint


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a published Lumina-mGPT checkpoint + Meta's VQGAN into one lumina_hf folder",
        description=(
            "Convert a published Lumina-mGPT checkpoint (folder or Hub id) and Meta's Chameleon VQGAN "
            "(vqgan.yaml + vqgan.ckpt) into a self-contained lumina_hf pipeline folder."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="Alpha-VLLM checkpoint folder or Hub id (config.json + safetensors)")
    p.add_argument("--vqgan", required=True, help="Meta's Chameleon tokenizer/ folder with vqgan.yaml and vqgan.ckpt")
    p.add_argument("--output", "-o", required=True, help="folder to create")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or Meta's text_tokenizer.json (default: searched in --checkpoint, then --vqgan)")
    p.add_argument("--target-size", type=int, default=None, help="image bucket target size: 512, 768 or 1024 (default: from the checkpoint's name)")
    p.add_argument("--dtype", default="bfloat16", choices=[*DTYPES, "auto"], help="language-model dtype (the VQGAN stays float32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB (also bounds memory use)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.add_argument("--revision", default=None, help="Hub revision when --checkpoint is a Hub id")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    out = convert_checkpoint(
        args.checkpoint,
        args.vqgan,
        args.output,
        tokenizer=args.tokenizer,
        target_size=args.target_size,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        revision=args.revision,
        progress=not args.no_progress,
    )
    sys.stdout.write(f"{out}\n")
    return 0
