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


# ------------------------------------------------------------------ bad input found by an adversarial pass
def cli_error(argv, capsys):
    from lumina_hf.cli import main

    with __import__("pytest").raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_generate_refuses_bad_requests_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import lumina_hf.commands.generate as generate

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(generate, "load_pipeline", no_loading)
    out = str(tmp_path / "x.png")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    locked = tmp_path / "locked"
    locked.mkdir()
    cases = [
        (["generate", "a", "--model", str(tmp_path / "missing"), "-o", out], "no such folder"),
        (["generate", "a", "--device", "bogus", "-o", out], "is not a device"),
        (["generate", "a", "--seed", str(2**64), "-o", out], "--seed must be between"),
        (["generate", "a", "--seed", "-1", "-o", out], "--seed must be between"),
        (["generate", "--task", "depth", "--image", str(not_an_image), "-o", out], "could not be read as an image"),
        (["generate", "a", "--image", str(not_an_image), "-o", out], "--image needs --task"),
        (["generate", "a", "-o", str(tmp_path / "a.txt")], "must end in .png"),
        (["generate", "--task", "describe", "--image", str(not_an_image), "-o", out], "writes text"),
        (["generate", "a", "-o", "/proc/x.png"], "cannot write to the folder"),
        (["generate", "a", "--speculative-window", "-2", "-o", out], "--speculative-window must be >= 0"),
        (["generate", "--task", "describe", "--image", str(not_an_image), "--speculative-window", "4"],
         "--speculative-window is for image outputs"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["generate", "a", "--device", "cuda", "-o", out], "this machine has none"))
    for argv, message in cases:
        assert message in cli_error(argv, capsys), argv
    assert not (tmp_path / "x.png").exists()


def test_describe_writes_text_to_a_txt_file_or_stdout(tmp_path, capsys):
    import PIL.Image

    from lumina_hf.cli import main

    image = tmp_path / "in.png"
    PIL.Image.new("RGB", (64, 64), "blue").save(image)
    answer = tmp_path / "answer.txt"
    assert main(["generate", "--model", "tiny-random", "--task", "describe", "--image", str(image), "-o", str(answer)]) == 0
    assert answer.read_text().endswith("\n") and "answer.txt (the answer)" in capsys.readouterr().out
    assert main(["generate", "--model", "tiny-random", "--task", "describe", "--image", str(image)]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_speculative_window_gives_the_greedy_image_of_token_by_token_decoding(tmp_path, capsys):
    """top-k 1 is greedy: lossless speculative decoding must write the very same image as plain decoding."""
    from lumina_hf.cli import main

    common = ["generate", "a red circle", "--model", "tiny-random", "--top-k", "1",
              "--num-candidates", "1", "--device", "cpu"]
    plain, fast = tmp_path / "plain.png", tmp_path / "fast.png"
    assert main(common + ["-o", str(plain)]) == 0
    assert main(common + ["--speculative-window", "8", "-o", str(fast)]) == 0
    assert plain.read_bytes() == fast.read_bytes()
