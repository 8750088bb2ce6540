"""Tokenize for training: `python -m lumina_hf.tokenize SOURCE -o OUT --model PATH [...]`, the same as
`lumina-hf tokenize`, as a module that launchers start once per process:
`accelerate launch --num_processes 8 -m lumina_hf.tokenize ...` (GPUs) or
`torchrun --nproc-per-node 2 -m lumina_hf.tokenize ... --device cpu` (CPUs, gloo)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import launcher_main
    from .commands import tokenize as verb

    return launcher_main(verb, argv)


if __name__ == "__main__":
    sys.exit(main())
