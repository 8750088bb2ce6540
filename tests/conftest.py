"""Shared test fixtures, and the deprecation guard: a test fails when a `DeprecationWarning` or `FutureWarning`
is raised while lumina_hf code is on the call stack (our own warnings and the ones libraries raise because of how
we call them), so the next deprecation on our paths is caught the day it appears. Deprecations that libraries
raise from their own internals, with none of our frames involved, are left to pytest's summary."""

import os
import re
import sys
import warnings

import pytest
import torch

import lumina_hf

LUMINA_SRC = os.path.dirname(os.path.abspath(lumina_hf.__file__)) + os.sep
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the examples (how the nano model was built) are tested too; they are run from the repository root
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# Deprecations that a library raises from its own implementation whatever we pass it (a newer release of that
# library fixes them, not a change of ours). Each entry: category, message pattern, where it comes from.
LIBRARY_INTERNAL = [
    (DeprecationWarning, r"torch\.jit\.script_method", "torch 2.13: imports inside torch.compile"),
    (DeprecationWarning, r"Use 'content=<\.\.\.>' to upload raw bytes", "huggingface_hub's create_commit calling httpx"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", "peft 0.21 PeftModel.__init__ and trl 1.16 utils"),
]


def library_internal(message, category) -> bool:
    return any(issubclass(category, cat) and re.search(pattern, str(message)) for cat, pattern, _ in LIBRARY_INTERNAL)


def lumina_frame_on_stack() -> str | None:
    """`file:line` of the innermost lumina_hf frame on the current call stack, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(LUMINA_SRC):
            return f"{os.path.relpath(filename, os.path.dirname(LUMINA_SRC.rstrip(os.sep)))}:{frame.f_lineno}"
        frame = frame.f_back
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    offenders: list[str] = []
    previous = warnings.showwarning

    def check(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DEPRECATIONS) and not library_internal(message, category):
            where = lumina_frame_on_stack()
            if where is not None:
                offenders.append(f"{category.__name__} via {where}: {message}")
        # hand the warning on to pytest's own recording (its summary still lists it)
        warnings.showwarning = previous
        try:
            warnings.warn_explicit(message, category, filename, lineno)
        finally:
            warnings.showwarning = check

    warnings.showwarning = check
    try:
        result = yield
    finally:
        warnings.showwarning = previous
    if offenders and not item.get_closest_marker("allow_deprecations"):
        unique = list(dict.fromkeys(offenders))
        pytest.fail("deprecated API used on lumina_hf's code path:\n" + "\n".join(unique[:10]), pytrace=False)
    return result


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_deprecations: the test exercises a deprecated alias on purpose")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped on CPU; run by benchmarks/device_check.py)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and one thread is immune to a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """For tests against the stand-in Hub (tests/fake_hub.py): xet off (the stand-in speaks the LFS protocol), no
    ambient token, no saved login."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
