"""The `lumina-hf` command line: one module per verb, each exposing `register(subparsers)`."""
