"""Train with a recipe: `accelerate launch --config_file recipes/accelerate_configs/X.yaml -m lumina_hf.train
--config recipes/.../config.yaml [--dry_run] [--key value ...]` (the same as `lumina-hf train`)."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import run_command
    from .commands.train import build_parser, run

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
