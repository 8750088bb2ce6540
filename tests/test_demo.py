"""`lumina-hf demo`: the engine behind the web app (with the tiny model, no browser), the command line, and the
app itself end to end in a real headless Chromium driven by Playwright, serving the shipped nano model.

The browser tests need Gradio, Playwright's Python package and a Chromium binary (Debian's `chromium`, or
`LUMINA_CHROMIUM`); `.ci/demo_setup.sh` installs all three. They are skipped, saying which is missing, only when
one of them cannot be found."""

import argparse
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import PIL.Image
import pytest
import torch

from lumina_hf import LuminaMGPTPipeline
from lumina_hf.demo import (
    ChatProgress,
    ChatResult,
    DemoEngine,
    DemoInputError,
    OmniResult,
    Progress,
    TextToImageResult,
    Waiting,
    aspect_label,
    exposure_notice,
    parse_size,
    resolve_seed,
    size_choices,
)
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.environ.get("LUMINA_TEST_ARTIFACTS", os.path.join(REPO, "test-artifacts"))


@pytest.fixture(scope="module")
def pipe():
    p = LuminaMGPTPipeline(model=build_tiny_model(seed=5), processor=build_tiny_processor(64))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def engine(pipe):
    e = DemoEngine(pipe, preview_interval=0.0)
    yield e
    e.close()


def run_all(events):
    return list(events)


def direct(pipe, prompt, seed, n=1, size=(64, 64), **kw):
    """What the pipeline itself gives for these seeds (the engine must give the same)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe([prompt] * n, width=size[0], height=size[1], generator=gens, num_candidates=1, **kw).images


class Spy:
    """Forwards to a pipeline and records each call's keyword arguments; `hold` (an Event) makes the first call
    wait until it is set, so requests pile up behind it; `fail` raises instead of running."""

    def __init__(self, pipe, hold=None, fail=None):
        self._pipe, self.calls, self.hold, self.fail = pipe, [], hold, fail

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.hold is not None and len(self.calls) == 1:
            assert self.hold.wait(30)
        if self.fail is not None:
            raise self.fail
        return self._pipe(**kwargs)


# ---------------------------------------------------------------------------------------------- input checks
def test_sizes_are_the_buckets_shown_as_aspect_ratios(pipe):
    ip = pipe.processor.image_processor
    choices = size_choices(ip)
    assert sorted(v for _, v in choices) == sorted(f"{w}x{h}" for w, h in ip.bucket_sizes)
    assert choices[0] == ("1:1 (64x64)", "64x64")  # the square first
    assert aspect_label(96, 64) == "3:2 (96x64)" and aspect_label(128, 32) == "4:1 (128x32)"
    assert parse_size("64x64", ip) == (64, 64)
    assert parse_size("4:1 (128x32)", ip) == (128, 32)  # a label holding the size
    with pytest.raises(DemoInputError, match=r"100x100 is not one of this model's sizes: .*64x64"):
        parse_size("100x100", ip)
    with pytest.raises(DemoInputError, match="is not WIDTHxHEIGHT"):
        parse_size("big", ip)


def test_seed_field():
    assert resolve_seed("12") == 12 and resolve_seed(7.0) == 7 and resolve_seed(" 0 ") == 0
    drawn = {resolve_seed("random") for _ in range(20)} | {resolve_seed("") for _ in range(5)}
    assert len(drawn) > 1 and all(0 <= s < 2**31 for s in drawn)
    for bad in ("abc", "1.5", -3, 2**40):
        with pytest.raises(DemoInputError, match="Seed"):
            resolve_seed(bad)


def test_exposure_notice_only_beyond_loopback():
    assert exposure_notice("127.0.0.1", False) is None
    assert exposure_notice("localhost", False) is None and exposure_notice("::1", False) is None
    assert "every network interface" in exposure_notice("0.0.0.0", False)
    assert "192.168.1.5" in exposure_notice("192.168.1.5", False)
    shared = exposure_notice("127.0.0.1", True)
    assert "--share" in shared and "public" in shared


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="   "), "Write a prompt first"),
        (dict(prompt="x" * 2001), "limit is 2000"),
        (dict(prompt="a cat", size="100x100"), "not one of this model's sizes"),
        (dict(prompt="a cat", top_k=0), "Top-k must be between"),
        (dict(prompt="a cat", temperature=0), "Temperature must be between"),
        (dict(prompt="a cat", num_images=9), "Number of images must be between 1 and 8"),
        (dict(prompt="a cat", seed="soon"), "Seed"),
        (dict(prompt="a cat", speculative_window=99), "Speculative window must be between 1 and 64"),
    ],
)
def test_bad_text_to_image_requests_are_refused_before_queueing(engine, kwargs, message):
    with pytest.raises(DemoInputError, match=message):
        engine.text_to_image(**kwargs)
    assert engine._pending == [] and engine._worker is None  # nothing reached the model


def test_bad_omni_and_chat_requests(engine, tmp_path):
    red = PIL.Image.new("RGB", (64, 64), "red")
    with pytest.raises(DemoInputError, match="Upload an image first: the depth task"):
        engine.omni(None, "depth")
    with pytest.raises(DemoInputError, match="Upload an image first"):
        engine.omni({"path": None}, "describe")
    with pytest.raises(DemoInputError, match="editing task needs its instruction"):
        engine.omni(red, "editing", "  ")
    with pytest.raises(DemoInputError, match="Pick a task"):
        engine.omni(red, "paint")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(DemoInputError, match=r"notes.png\) is not an image this app can read"):
        engine.omni({"path": str(text_file)}, "describe")
    with pytest.raises(DemoInputError, match="too small"):
        engine.omni(PIL.Image.new("RGB", (16, 16)), "describe")
    with pytest.raises(DemoInputError, match="Write a message"):
        engine.chat([], "  ")
    with pytest.raises(DemoInputError, match="not an image"):
        engine.chat([], "hi", [str(text_file)])


# ---------------------------------------------------------------------------------------------- text to image
def test_text_to_image_streams_progress_and_rows_then_the_pipelines_images(engine, pipe):
    events = run_all(engine.text_to_image("a cat", size="64x64", seed=11, num_images=2, num_candidates=1))
    result = events[-1]
    assert isinstance(result, TextToImageResult) and not result.stopped
    progress = [e for e in events if isinstance(e, Progress)]
    total = 4 * 5 + 1  # a 4x4 grid (factor 16): four rows of 4 codes + row end, then the end token
    assert progress and progress[-1].step == total and all(p.total == total for p in progress)
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    previews = [p for p in progress if p.preview is not None]
    assert [p.rows_done for p in previews] == [1, 2, 3, 4]  # one decode per finished row (preview_interval=0)
    assert all(p.preview.size == (64, 64) for p in previews)
    # one row drawn: the finished top row (16 px) decoded, the rest still gray
    top = np.asarray(previews[0].preview)
    assert (top[16:] == 128).all() and not (top[:16] == 128).all()
    # the engine gives exactly what the pipeline gives for these seeds, and says which seed is which
    expected = direct(pipe, "a cat", 11, n=2)
    assert [g.seed for g in result.images] == [11, 12]
    for g, e in zip(result.images, expected):
        assert np.array_equal(np.asarray(g.image), np.asarray(e))
    assert result.images[1].caption.startswith("seed 12 · 64x64 · guidance 4 · top-k 2000 · temperature 1")
    # the fully drawn preview of the first image is that image
    assert np.array_equal(np.asarray(previews[-1].preview), np.asarray(expected[0]))
    assert result.settings["seed"] == 11 and result.settings["num_images"] == 2


def test_waiting_requests_with_the_same_settings_run_as_one_batch(pipe):
    hold = threading.Event()
    spy = Spy(pipe, hold=hold)
    engine = DemoEngine(spy, preview_interval=0.0)
    try:
        first = engine.text_to_image("first", size="64x64", seed=1, num_candidates=1)
        outcomes = {}

        def consume(name, events):
            outcomes[name] = run_all(events)

        threads = [threading.Thread(target=consume, args=("first", first))]
        threads[0].start()
        deadline = time.monotonic() + 30
        while not spy.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        b = engine.text_to_image("second", size="64x64", seed=5, num_images=2, num_candidates=1)
        c = engine.text_to_image("third", size="64x64", seed=9, num_candidates=1)
        d = engine.text_to_image("fourth", size="128x32", seed=9, num_candidates=1)  # another size: its own call
        for name, events in (("b", b), ("c", c), ("d", d)):
            threads.append(threading.Thread(target=consume, args=(name, events)))
            threads[-1].start()
        time.sleep(0.2)
        hold.set()
        for t in threads:
            t.join(120)
        assert [call["prompt"] for call in spy.calls] == [["first"], ["second", "second", "third"], ["fourth"]]
        assert any(isinstance(e, Waiting) and e.ahead >= 1 for e in outcomes["c"])
        # batching does not change what anyone gets: each image is the pipeline's own for its seed
        for name, prompt, seed, n in (("b", "second", 5, 2), ("c", "third", 9, 1)):
            got = outcomes[name][-1]
            assert [g.seed for g in got.images] == list(range(seed, seed + n))
            for g, e in zip(got.images, direct(pipe, prompt, seed, n=n)):
                assert np.array_equal(np.asarray(g.image), np.asarray(e))
        assert outcomes["d"][-1].images[0].image.size == (128, 32)
    finally:
        hold.set()
        engine.close()


def test_stop_interrupts_through_the_callback_and_the_engine_keeps_serving(engine):
    events = engine.text_to_image("a cat", size="128x32", seed=0, num_candidates=1, session="alice")
    first = next(events)
    assert isinstance(first, Progress) and first.step < first.total
    assert engine.stop("bob") == 0  # another session's stop does not touch it
    assert engine.stop("alice") == 1
    rest = run_all(events)
    result = rest[-1]
    assert isinstance(result, TextToImageResult) and result.stopped and result.images == []
    assert all(e.step < e.total for e in rest if isinstance(e, Progress))
    again = run_all(engine.text_to_image("a cat", size="64x64", seed=0, num_candidates=1, session="alice"))[-1]
    assert not again.stopped and len(again.images) == 1


def test_stop_takes_a_waiting_request_out_of_the_queue_at_once(pipe):
    hold = threading.Event()
    spy = Spy(pipe, hold=hold)
    engine = DemoEngine(spy)
    try:
        first = engine.text_to_image("first", size="64x64", seed=1, num_candidates=1, session="a")
        done = []
        worker = threading.Thread(target=lambda: done.append(run_all(first)))
        worker.start()
        deadline = time.monotonic() + 30
        while not spy.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = engine.text_to_image("second", size="64x64", seed=2, num_candidates=1, session="b")
        assert next(waiting) == Waiting(1)
        assert engine.stop("b") == 1
        result = next(waiting)  # while the first request still holds the model
        assert isinstance(result, TextToImageResult) and result.stopped and not hold.is_set()
        hold.set()
        worker.join(60)
        assert len(done[0][-1].images) == 1 and [c["prompt"] for c in spy.calls] == [["first"]]
    finally:
        hold.set()
        engine.close()


def test_a_user_who_leaves_stops_the_request(engine):
    events = engine.text_to_image("a cat", size="128x32", seed=0, num_candidates=1)
    assert isinstance(next(events), Progress)
    events.close()  # the browser went away
    result = run_all(engine.text_to_image("a dog", size="64x64", seed=1, num_candidates=1))[-1]
    assert len(result.images) == 1


def test_request_errors_reach_that_request_only(pipe):
    spy = Spy(pipe, fail=ValueError("prompt plus image exceed the context"))
    engine = DemoEngine(spy)
    try:
        with pytest.raises(DemoInputError, match="exceed the context"):
            run_all(engine.text_to_image("a cat", size="64x64", num_candidates=1))
        spy.fail = RuntimeError("CUDA out of memory")
        with pytest.raises(RuntimeError, match="out of memory"):
            run_all(engine.text_to_image("a cat", size="64x64", num_candidates=1))
        spy.fail = None
        assert len(run_all(engine.text_to_image("a cat", size="64x64", num_candidates=1))[-1].images) == 1
    finally:
        engine.close()


def test_speculative_window_is_offered_and_passed_when_the_pipeline_has_it(pipe):
    class Speculative(LuminaMGPTPipeline):  # records the window it is called with
        def __call__(self, *args, speculative_window=None, **kwargs):
            self.seen_window = speculative_window
            return super().__call__(*args, speculative_window=speculative_window, **kwargs)

    class Without(LuminaMGPTPipeline):  # a pipeline whose call takes no speculative window
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    spec = Speculative(model=pipe.model, processor=pipe.processor)
    spec.set_progress_bar_config(disable=True)
    engine = DemoEngine(spec)
    without = DemoEngine(Without(model=pipe.model, processor=pipe.processor))
    try:
        assert engine.supports_speculative and DemoEngine(pipe).supports_speculative
        assert not without.supports_speculative
        with pytest.raises(DemoInputError, match="no speculative decoding"):
            without.text_to_image("a cat", speculative_window=4)
        result = run_all(engine.text_to_image("a cat", size="64x64", num_candidates=1, speculative_window=3))[-1]
        assert spec.seen_window == 3 and "speculative window 3" in result.images[0].caption
    finally:
        engine.close()
        without.close()


# ---------------------------------------------------------------------------------------------- Omni and chat
def test_omni_describe_gives_text_and_image_tasks_give_an_image_of_the_inputs_bucket(engine, tmp_path):
    path = tmp_path / "in.png"
    PIL.Image.new("RGB", (120, 60), "blue").save(path)
    described = run_all(engine.omni({"path": str(path)}, "describe", seed=3))[-1]
    assert isinstance(described, OmniResult) and isinstance(described.text, str) and described.image is None
    events = run_all(engine.omni(str(path), "depth", seed=3))
    depth = events[-1]
    bucket = engine.image_processor.select_bucket(120, 60)
    assert bucket == (64, 32)
    assert depth.image is not None and depth.image.size == bucket and depth.text is None
    assert any(isinstance(e, Progress) and e.preview is not None for e in events)
    edited = run_all(engine.omni(str(path), "editing", "make it red", seed=3))[-1]
    assert edited.image.size == bucket


def test_chat_streams_text_and_keeps_images_across_turns(engine, pipe):
    red = PIL.Image.new("RGB", (64, 64), "red")
    events = run_all(engine.chat([], "What is this?", [red], max_new_tokens=12, seed=1))
    answer = events[-1]
    assert isinstance(answer, ChatResult) and not answer.stopped
    assert any(isinstance(e, ChatProgress) for e in events)
    history = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image", "image": red}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."},
                                          {"type": "image", "image": PIL.Image.new("RGB", (64, 64), "blue")}]},
    ]
    follow = run_all(engine.chat(history, "And this one?", [PIL.Image.new("RGB", (128, 32), "green")],
                                 max_new_tokens=8, seed=2))[-1]
    assert isinstance(follow, ChatResult)
    # the model saw the whole conversation, its three images VQ-encoded in it
    inputs = pipe.processor.apply_chat_template(history + [{"role": "user", "content": [
        {"type": "text", "text": "And this one?"}, {"type": "image", "image": PIL.Image.new("RGB", (128, 32), "green")}]}])
    ids = pipe.model.fill_image_placeholders(inputs["input_ids"], inputs["pixel_values"])[0][0].tolist()
    assert ids.count(pipe.model.config.image_start_token_id) == 3


def test_chat_parts_interleave_text_and_generated_images(engine, pipe, monkeypatch):
    """The answer's image spans come back as images, in place (a fake answer stands in for the random model's)."""
    proc = pipe.processor
    grid = pipe.model.model.codes_to_token_ids(torch.tensor([[1, 2], [3, 4]]))
    span = proc.unirep_ids(grid)
    text_ids = proc.tokenizer("Here:", add_special_tokens=False)["input_ids"]
    answer = text_ids + span + [pipe.model.config.separator_token_id]

    def fake_generate(input_ids=None, **kwargs):
        return torch.cat([input_ids, torch.tensor([answer])], dim=1)

    monkeypatch.setattr(pipe.model, "generate", fake_generate)
    result = run_all(engine.chat([], "draw", max_new_tokens=50))[-1]
    assert [p["type"] for p in result.parts] == ["text", "image"]
    assert result.parts[0]["text"] == "Here:" and result.parts[1]["image"].size == (32, 32)
    assert result.errors == []
    assert engine._chat_progress(text_ids + span[:5]).drawing == 4  # start token, then 4 more so far


def test_chat_stop(engine):
    events = engine.chat([], "tell me everything", max_new_tokens=4000, seed=0, session="s")
    assert isinstance(next(events), ChatProgress)
    engine.stop("s")
    result = run_all(events)[-1]
    assert result.stopped


# ---------------------------------------------------------------------------------------------- command line
def demo_parser():
    from lumina_hf.commands import demo

    parser = argparse.ArgumentParser(prog="lumina-hf")
    demo.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_command_defaults_bind_to_loopback():
    args = demo_parser().parse_args(["demo"])
    assert (args.model, args.host, args.port, args.share, args.quantize) == ("nano", "127.0.0.1", 7860, False, None)
    args = demo_parser().parse_args(["demo", "--share", "--port", "9000", "--model", "some/repo"])
    assert args.share and args.port == 9000 and args.model == "some/repo"
    assert demo_parser().parse_args(["demo", "--no-share"]).share is False


def cli_exit_code(argv) -> int:
    from lumina_hf.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_command_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails
    assert cli_exit_code(["demo"]) == 2
    assert capsys.readouterr().err == 'error: the demo needs Gradio: pip install "lumina-hf[demo]"\n'


def test_command_quantize_that_cannot_run_here_is_refused_before_loading(monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_exit_code(["demo", "--quantize", "int4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --quantize int4: ")
    assert ("no CPU kernels" in err) if importlib.util.find_spec("torchao") else ('pip install "lumina-hf[quantization]"' in err)


def test_library_imports_without_gradio_and_build_demo_says_what_to_install():
    code = (
        "import sys; sys.modules['gradio'] = None\n"
        "import lumina_hf.demo as d\n"
        "try:\n    d.build_demo(None)\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'the demo needs Gradio: pip install "lumina-hf[demo]"'


# ---------------------------------------------------------------------------------------------- Gradio layer
def test_build_demo_and_error_messages(pipe):
    gr = pytest.importorskip("gradio")
    from lumina_hf.demo import build_demo
    from lumina_hf.demo.app import _as_user_error

    demo = build_demo(pipe, notice="The app listens on every network interface.")
    try:
        assert isinstance(demo, gr.Blocks)
        config = demo.get_config_file()
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        assert {"Prompt", "Size (aspect ratio)", "Input image", "Task", "Conversation", "Results"} <= labels
        texts = " ".join(str(c.get("props", {}).get("value")) for c in config["components"])
        assert "every network interface" in texts  # the banner
    finally:
        demo.lumina_engine.close()
    user = _as_user_error(gr, DemoInputError("Write a prompt first."))
    assert isinstance(user, gr.Error) and user.message == "Write a prompt first."
    internal = _as_user_error(gr, RuntimeError("CUDA out of memory\n  at line 3"))
    assert internal.message.count("\n") == 0 and "CUDA out of memory" in internal.message
    assert "still running" in internal.message and "Traceback" not in internal.message


# ---------------------------------------------------------------------------------------------- in a browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PALETTE = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 210, 30),
           "black": (15, 15, 15), "white": (240, 240, 240)}
SERVER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from lumina_hf.cli import main
sys.exit(main(["demo", *sys.argv[1:]]))
"""


def chromium_path() -> str | None:
    for candidate in (os.environ.get("LUMINA_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("gradio", reason="the demo needs Gradio: pip install 'lumina-hf[demo]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install 'lumina-hf[demo-test]' for the browser tests")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set LUMINA_CHROMIUM); .ci/demo_setup.sh installs it")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    """`lumina-hf demo` with the nano model on a free loopback port, stopped at the end whatever happens."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("demo") / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo server did not answer in 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
    log = log_path.read_text()
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    pg = context.new_page()
    pg.set_default_timeout(150_000)
    pg.goto(server)
    pg.wait_for_selector("#t2i-prompt textarea")
    yield pg
    context.close()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def start_generation(page, prompt: str, seed, num_images: int = 1) -> None:
    page.fill("#t2i-prompt textarea", prompt)
    page.fill("#t2i-seed textarea", str(seed))
    set_number(page, "t2i-candidates", 1)  # one sample per image: keeps the test short
    set_number(page, "t2i-num-images", num_images)
    page.click("#t2i-generate")


def gallery_images(page, n: int) -> list[PIL.Image.Image]:
    page.wait_for_function(f"document.querySelectorAll('#t2i-gallery img').length >= {n}")
    images = []
    for src in page.locator("#t2i-gallery img").evaluate_all("els => els.map(e => e.src)"):
        response = page.request.get(src)
        assert response.ok, src
        images.append(PIL.Image.open(io.BytesIO(response.body())).convert("RGB"))
    return images


def palette_shares(image: PIL.Image.Image) -> dict[str, float]:
    """Share of the pixels nearest to each palette color."""
    arr = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    names = list(PALETTE)
    dist = ((arr[:, None, :] - np.array([PALETTE[n] for n in names])[None]) ** 2).sum(-1)
    counts = np.bincount(dist.argmin(1), minlength=len(names))
    return {n: c / len(arr) for n, c in zip(names, counts)}


def screenshot(page, name: str) -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path, full_page=True)
    return path


def test_browser_text_to_image_then_omni_describe(page):
    start = time.monotonic()
    start_generation(page, "a red circle on a blue background", seed=0, num_images=2)
    page.wait_for_selector("#t2i-status progress", state="attached")  # the live progress bar over tokens
    # the image appears row by row before the results do
    page.wait_for_function("document.querySelector('#t2i-preview img') !== null"
                           " && document.querySelectorAll('#t2i-gallery img').length === 0")
    images = gallery_images(page, 2)
    assert [im.size for im in images] == [(96, 96), (96, 96)]
    shares = [palette_shares(im) for im in images]
    for s in shares:  # the background is most of the picture: blue
        assert max(s, key=s.get) == "blue", s
    assert max(s["red"] for s in shares) > 0.03, shares  # and there is a red shape
    info = page.locator("#t2i-info").inner_text()
    assert "a red circle on a blue background" in info and "96x96" in info
    screenshot(page, "demo-text-to-image.png")

    page.get_by_role("tab", name="Omni").click()
    from examples.nano.shapes import draw_shape

    shape, _ = draw_shape("square", "yellow", "black", (96, 96))
    upload = os.path.join(ARTIFACTS, "upload-yellow-square.png")
    shape.save(upload)
    page.set_input_files("#omni-image input[type=file]", upload)
    page.locator("#omni-task input").fill("describe")
    page.locator("#omni-task input").press("Enter")
    page.click("#omni-run")
    page.wait_for_function("document.querySelector('#omni-answer textarea').value.trim().length > 0")
    answer = page.locator("#omni-answer textarea").input_value().strip()
    colors, shapes = "|".join(PALETTE), "circle|square|triangle"
    assert re.fullmatch(rf"a ({colors}) ({shapes}) on a ({colors}) background", answer), answer  # the nano's words
    screenshot(page, "demo-omni-describe.png")
    assert time.monotonic() - start < 240


def test_browser_bad_input_gets_a_message_and_the_server_keeps_serving(page, tmp_path):
    def message(text):
        page.get_by_text(text).first.wait_for()

    page.click("#t2i-generate")  # empty prompt
    message("Write a prompt first")
    page.fill("#t2i-prompt textarea", "a red circle on a blue background")
    page.locator("#t2i-size input").fill("100x100")  # a size outside the buckets
    page.locator("#t2i-size input").press("Enter")
    page.click("#t2i-generate")
    message("100x100 is not one of this model's sizes")

    page.get_by_role("tab", name="Omni").click()
    page.click("#omni-run")  # no image
    message("Upload an image first")
    fake = tmp_path / "holiday.png"
    fake.write_text("these are words, not pixels")
    page.set_input_files("#omni-image input[type=file]", str(fake))
    page.click("#omni-run")
    message("is not an image this app can read")
    screenshot(page, "demo-bad-input.png")
    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(50 * 1024 * 1024))
    page.reload()
    page.get_by_role("tab", name="Omni").click()
    page.set_input_files("#omni-image input[type=file]", str(big))
    message("exceed the maximum allowed size")
    assert "Traceback" not in page.content()

    page.get_by_role("tab", name="Text to image").click()  # still serving
    start_generation(page, "a yellow triangle on a black background", seed=1)
    assert gallery_images(page, 1)[0].size == (96, 96)


def test_browser_two_pages_at_once_both_finish(browser, server):
    contexts = [browser.new_context(viewport={"width": 1280, "height": 1100}) for _ in range(2)]
    try:
        pages = [c.new_page() for c in contexts]
        for pg in pages:
            pg.set_default_timeout(150_000)
            pg.goto(server)
            pg.wait_for_selector("#t2i-prompt textarea")
        start_generation(pages[0], "a green square on a white background", seed=3)
        start_generation(pages[1], "a blue circle on a yellow background", seed=4)
        first, second = gallery_images(pages[0], 1)[0], gallery_images(pages[1], 1)[0]
        assert first.size == second.size == (96, 96)
        for pg, prompt in zip(pages, ("a green square on a white background", "a blue circle on a yellow background")):
            assert prompt in pg.locator("#t2i-info").inner_text()  # each page got its own request's answer
        screenshot(pages[1], "demo-second-page.png")
    finally:
        for c in contexts:
            c.close()
