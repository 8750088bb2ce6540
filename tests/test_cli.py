"""The command line as one package: `lumina_hf.commands.<verb>` modules behind a thin dispatcher, library code free of
argparse and SystemExit, and user errors as one line with exit status 2."""

import ast
import os
import pathlib
import subprocess
import sys

import lumina_hf
from lumina_hf.commands import VERBS

PACKAGE = pathlib.Path(lumina_hf.__file__).parent


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lumina_hf.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_every_verb_is_a_module_with_register():
    import importlib

    for name in VERBS:
        module = importlib.import_module(f"lumina_hf.commands.{name}")
        assert callable(module.register), name
    cli_source = (PACKAGE / "cli.py").read_text()
    assert "add_argument(\"prompt\"" not in cli_source and "def register" not in cli_source  # the dispatcher only


def test_library_modules_use_no_argparse_and_raise_no_system_exit():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("commands/") or rel in ("cli.py", "train.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if "argparse" in names:
                    offenders.append(f"{rel}:{node.lineno} imports argparse")
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                offenders.append(f"{rel}:{node.lineno} uses SystemExit")
    assert not offenders, offenders


def test_user_errors_are_one_line_with_exit_status_2(tmp_path):
    bad_output = str(tmp_path / "missing-folder" / "x.png")
    proc = run_cli("generate", "a red circle", "--model", "tiny-random", "-o", bad_output)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "missing-folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    debug = run_cli("--debug", "generate", "a red circle", "--model", "tiny-random", "-o", bad_output)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CommandError" in debug.stderr


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"lumina-hf {lumina_hf.__version__}"
