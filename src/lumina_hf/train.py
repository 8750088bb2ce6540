"""Train with a recipe: `accelerate launch --config_file recipes/accelerate_configs/X.yaml -m lumina_hf.train
--config recipes/.../config.yaml [--dry_run] [--key value ...]` (the same as `lumina-hf train`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import launcher_main
    from .commands import train as verb

    return launcher_main(verb, argv)


if __name__ == "__main__":
    sys.exit(main())
