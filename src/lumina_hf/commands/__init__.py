"""The `lumina-hf` command line: one module per verb, each exposing `register(subparsers)`.

`register` adds the verb's parser and sets `func`, called with the parsed arguments and returning an exit code.
Library code raises exceptions; `lumina_hf.cli.main` turns `CommandError`, `ValueError` and `OSError` into one
line on stderr and exit status 2 (`--debug` shows the traceback instead).
"""

# module names under lumina_hf.commands, in the order `lumina-hf --help` lists them
VERBS = ["generate", "tokenize", "train", "convert", "push", "demo"]


class CommandError(Exception):
    """A problem with what the user asked for, reported as one line (`error: <message>`) with exit status 2."""


__all__ = ["VERBS", "CommandError"]
