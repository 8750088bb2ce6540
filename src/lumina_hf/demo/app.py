"""The Gradio layer of the demo: `build_demo(pipe) -> gradio.Blocks` wired to a `DemoEngine`, and `launch()`."""


import logging
from types import SimpleNamespace

from ..processing_lumina_mgpt import IMAGE_MARKER

from .engine import DemoEngine
from .events import ChatResult, OmniResult, Progress, TextToImageResult, Waiting
from .inputs import (
    GENERIC_EXAMPLES,
    MAX_CANDIDATES,
    MAX_FILE_SIZE,
    MAX_IMAGES,
    NANO_CHAT_EXAMPLES,
    NANO_EXAMPLES,
    TASK_TEXT,
    TASKS,
    DemoInputError,
    exposure_notice,
    is_nano_pipeline,
    load_image,
    nano_example_images,
    size_choices,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- Gradio layer
def progress_html(event: Progress | Waiting | None, note: str = "") -> str:
    """The status line above the result: a progress bar over image tokens, or the place in the queue."""
    if isinstance(event, Waiting):
        return f'<div class="lumina-status">Waiting for the model: {event.ahead} request(s) ahead. {note}</div>'
    if isinstance(event, Progress):
        pct = 100.0 * event.step / max(event.total, 1)
        return (
            f'<div class="lumina-status"><progress max="{event.total}" value="{event.step}" style="width:100%">'
            f"{pct:.0f}%</progress><br>token {event.step}/{event.total} · row {event.rows_done}/{event.rows} {note}</div>"
        )
    return f'<div class="lumina-status">{note}</div>'


def settings_markdown(result: TextToImageResult) -> str:
    """A table of each image's seed and settings."""
    if result.stopped:
        return "Stopped: no image was finished."
    s = result.settings
    lines = [
        f"**{len(result.images)} image(s) in {result.seconds:.1f} s** · prompt: {s['prompt']}"
        + (f" · negative: {s['negative_prompt']}" if s.get("negative_prompt") else ""),
        "",
        "| # | seed | size | guidance | top-k | temperature | candidates |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, g in enumerate(result.images):
        lines.append(f"| {i + 1} | {g.seed} | {s['width']}x{s['height']} | {s['guidance_scale']:g} | {s['top_k']} | "
                     f"{s['temperature']:g} | {s['num_candidates']} |")
    return "\n".join(lines)


def _session(request) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def _as_user_error(gr, err: BaseException):
    """The one-line message for a failed request: the request's own problem as is, anything else as a short
    internal error (its traceback goes to the server log)."""
    if isinstance(err, DemoInputError):
        return gr.Error(str(err), print_exception=False)
    # the engine's worker has logged the traceback of a failure inside the model call
    logger.error("demo request failed: %s: %s", type(err).__name__, err)
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return gr.Error(f"The request failed ({type(err).__name__}{': ' + first if first else ''}). "
                    "The app is still running; see the server log for details.", print_exception=False)


# The page is built section by section: each `_*_tab` lays out its part inside the Blocks' nested `with` blocks and
# returns its components; the `_wire_*` functions then connect them to the callbacks, whose logic is in `DemoEngine`.
def build_demo(pipe, *, title: str = "Lumina-mGPT", notice: str | None = None, examples=None, engine: DemoEngine | None = None):
    """The Gradio app for `pipe`: tabs "Text to image", "Omni" and "Chat", with its queue set up (one worker
    runs the model; up to 16 requests in the queue per event). `notice` is shown as a banner (the command line
    passes the exposure warning for --share or a public host). `examples`: text-to-image examples as
    `[prompt, size]` rows (default: the nano model's, when `pipe` is the nano model). Needs Gradio
    (`pip install "lumina-hf[demo]"`). Serve it with `launch()` (which sets the upload limit) or with
    `.launch(max_file_size=MAX_FILE_SIZE)`."""
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError('the demo needs Gradio: pip install "lumina-hf[demo]"') from err

    engine = engine or DemoEngine(pipe)
    nano = is_nano_pipeline(pipe)
    if examples is None:
        examples = NANO_EXAMPLES if nano else GENERIC_EXAMPLES
    limit = dict(concurrency_id="model", concurrency_limit=16)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        _header(gr, pipe, title, notice, nano)
        with gr.Tabs():
            t2i = _text_to_image_tab(gr, engine, examples)
            omni = _omni_tab(gr, nano)
            chat = _chat_tab(gr, engine, nano)
        _wire_text_to_image(gr, engine, t2i, limit)
        stop = _stop_callback(gr, engine)
        for button in (t2i.halt, omni.halt, chat.halt):
            button.click(stop, None, None, queue=False)
        _wire_omni(gr, engine, omni, limit)
        _wire_chat(gr, engine, chat, limit)
    demo.queue(max_size=64)
    demo.lumina_engine = engine  # for callers that want to close it or inspect it
    return demo


# ---------------------------------------------------------------------------------------------- page sections
def _header(gr, pipe, title: str, notice: str | None, nano: bool) -> None:
    """The title, the model it runs and, when given, the exposure banner."""
    if nano:
        about = ("Model: Lumina-mGPT-nano, the small model shipped with lumina_hf. It draws one circle, square or "
                 "triangle in red, green, blue, yellow, black or white on a background of another of those colors, "
                 "at 96x96, 128x64 and 64x128; its Omni tasks are segmentation and describe.")
    else:
        about = f"Model: `{getattr(pipe, 'name_or_path', None) or 'built in memory'}`"
    gr.Markdown(f"# {title}\n{about}")
    if notice:
        gr.Markdown(f"**⚠ {notice}**", elem_id="exposure-notice")


def _text_to_image_tab(gr, engine: DemoEngine, examples) -> SimpleNamespace:
    """The "Text to image" tab: prompt, size and sampling controls on the left, progress, preview and results on
    the right."""
    with gr.Tab("Text to image", id="t2i"):
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on a blue background",
                                    elem_id="t2i-prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="t2i-negative")
                size = gr.Dropdown(choices=size_choices(engine.image_processor), value=engine.default_size,
                                   label="Size (aspect ratio)", allow_custom_value=True, elem_id="t2i-size")
                with gr.Accordion("Sampling", open=True):
                    sampling = _text_to_image_sampling(gr, engine)
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                    halt = gr.Button("Stop", variant="stop", elem_id="t2i-stop")
                gr.Examples(examples=examples, inputs=[prompt, size], label="Examples (click to fill in)")
            with gr.Column(scale=1):
                status = gr.HTML(elem_id="t2i-status")
                preview = gr.Image(label="Drawing row by row", type="pil", format="png", interactive=False,
                                   height=256, elem_id="t2i-preview")
                gallery = gr.Gallery(label="Results", columns=4, format="png", preview=False,
                                     object_fit="contain", elem_id="t2i-gallery")
                info = gr.Markdown(elem_id="t2i-info")
    return SimpleNamespace(inputs=[prompt, negative, size, *sampling], outputs=[status, preview, gallery, info],
                           prompt=prompt, go=go, halt=halt)


def _text_to_image_sampling(gr, engine: DemoEngine) -> list:
    """The text-to-image sampling controls, in the order `generate` takes them: guidance, top-k, temperature,
    seed, number of images, candidates, speculative window (shown only when the pipeline has it)."""
    guidance = gr.Slider(0, 10, value=engine.default("guidance_scale"), step=0.1,
                         label="Guidance scale", elem_id="t2i-guidance")
    top_k = gr.Slider(1, engine.num_codes, value=engine.default("image_top_k"), step=1,
                      label="Top-k (image codes)", elem_id="t2i-topk")
    temperature = gr.Slider(0.05, 2.0, value=engine.default("temperature"), step=0.05,
                            label="Temperature", elem_id="t2i-temperature")
    seed = gr.Textbox(value="random", label="Seed ('random' or a number; image i gets seed + i)",
                      elem_id="t2i-seed")
    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images",
                           elem_id="t2i-num-images")
    num_candidates = gr.Slider(
        1, MAX_CANDIDATES, value=engine.default("num_candidates"), step=1,
        label="Candidates per image (the model keeps the one it describes best as the prompt)",
        elem_id="t2i-candidates")
    speculative = gr.Slider(0, 16, value=0, step=1, label="Speculative window (0: off)",
                            visible=engine.supports_speculative, elem_id="t2i-speculative")
    return [guidance, top_k, temperature, seed, num_images, num_candidates, speculative]


def _omni_tab(gr, nano: bool) -> SimpleNamespace:
    """The "Omni" tab: an input image, a task (and its text when the task takes one), the output image or answer."""
    with gr.Tab("Omni", id="omni"):
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Input image", type="filepath", sources=["upload", "clipboard"],
                                 height=256, elem_id="omni-image")
                task = gr.Dropdown(list(TASKS), value="describe" if nano else "depth", label="Task",
                                   elem_id="omni-task")
                text = gr.Textbox(label="Text", visible=False, elem_id="omni-text-in")
                seed = gr.Textbox(value="random", label="Seed", elem_id="omni-seed")
                with gr.Row():
                    go = gr.Button("Run", variant="primary", elem_id="omni-run")
                    halt = gr.Button("Stop", variant="stop", elem_id="omni-stop")
                if nano:
                    gr.Examples(
                        examples=[[p, t] for p, t in zip(nano_example_images(),
                                                          ["describe", "segmentation", "describe"])],
                        inputs=[image, task], label="Examples (click to fill in)")
            with gr.Column():
                status = gr.HTML(elem_id="omni-status")
                out = gr.Image(label="Output image", type="pil", format="png", interactive=False,
                               height=256, elem_id="omni-output")
                answer = gr.Textbox(label="Answer (describe)", lines=3, interactive=False,
                                    elem_id="omni-answer")
    return SimpleNamespace(inputs=[image, task, text, seed], outputs=[status, out, answer], task=task, text=text,
                           go=go, halt=halt)


def _chat_tab(gr, engine: DemoEngine, nano: bool) -> SimpleNamespace:
    """The "Chat" tab: the conversation, a message box that takes images, and the text sampling controls."""
    with gr.Tab("Chat", id="chat"):
        state = gr.State([])
        chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chat-log")
        box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", elem_id="chat-box", label="Message",
                                   placeholder="Write a message; attach images with the clip")
        with gr.Row():
            halt = gr.Button("Stop", variant="stop", elem_id="chat-stop")
            clear = gr.Button("Clear", elem_id="chat-clear")
        with gr.Accordion("Sampling", open=False):
            max_new = gr.Slider(16, max(4096, 2 * engine.default_max_new_tokens), step=1,
                                value=engine.default_max_new_tokens, label="Max new tokens")
            temperature = gr.Slider(0.05, 2.0, value=engine.default("temperature"), step=0.05,
                                    label="Temperature")
            top_k = gr.Slider(1, 200, value=engine.default("text_top_k"), step=1, label="Text top-k")
        if nano:
            gr.Examples(examples=[[{"text": t, "files": []}] for t in NANO_CHAT_EXAMPLES], inputs=[box],
                        label="Examples (click to fill in)")
    return SimpleNamespace(state=state, chatbot=chatbot, box=box, halt=halt, clear=clear,
                           sampling=[max_new, temperature, top_k])


# ---------------------------------------------------------------------------------------------- events
def _wire_text_to_image(gr, engine: DemoEngine, t2i: SimpleNamespace, limit: dict) -> None:
    """Generate (the button, or Enter in the prompt) streams into the status, preview, gallery and settings."""
    generate = _text_to_image_callback(gr, engine)
    t2i.go.click(generate, t2i.inputs, t2i.outputs, show_progress="minimal", **limit)
    t2i.prompt.submit(generate, t2i.inputs, t2i.outputs, show_progress="minimal", **limit)


def _wire_omni(gr, engine: DemoEngine, omni: SimpleNamespace, limit: dict) -> None:
    """The task choice shows or hides the text field; Run streams into the status, output image and answer."""
    omni.task.change(_task_changed_callback(gr), omni.task, omni.text, queue=False)
    # the upload is read by the app itself (preprocess=False), so a file that is not an image gets a message
    omni.go.click(_omni_callback(gr, engine), omni.inputs, omni.outputs, preprocess=False, show_progress="minimal",
                  **limit)


def _wire_chat(gr, engine: DemoEngine, chat: SimpleNamespace, limit: dict) -> None:
    """Sending a message streams the answer into the conversation (the box is locked meanwhile); Clear empties it."""
    submitted = chat.box.submit(_chat_callback(gr, engine), [chat.state, chat.box, *chat.sampling],
                                [chat.chatbot, chat.state, chat.box], show_progress="minimal", **limit)

    def chat_unlock():
        return gr.MultimodalTextbox(interactive=True)

    submitted.then(chat_unlock, None, chat.box, queue=False)
    chat.clear.click(lambda: ([], []), None, [chat.chatbot, chat.state], queue=False)


# ---------------------------------------------------------------------------------------------- callbacks
def _text_to_image_callback(gr, engine: DemoEngine):
    """`generate`: runs one text-to-image request, yielding (status, preview, gallery, settings) as it goes."""

    def generate(prompt, negative_prompt, size, guidance, top_k, temperature, seed, num_images, num_candidates,
                 speculative_window, request: gr.Request):
        try:
            events = engine.text_to_image(prompt, negative_prompt, size, guidance, top_k, temperature, seed,
                                          num_images, num_candidates, speculative_window, session=_session(request))
            yield progress_html(None, "Starting…"), None, gr.skip(), gr.skip()
            for ev in events:
                if isinstance(ev, TextToImageResult):
                    if ev.stopped:
                        gr.Warning("Stopped.")
                        yield progress_html(None, "Stopped."), gr.skip(), gr.skip(), settings_markdown(ev)
                    else:
                        gallery = [(g.image, g.caption) for g in ev.images]
                        yield (progress_html(None, f"Done in {ev.seconds:.1f} s."), ev.images[0].image, gallery,
                               settings_markdown(ev))
                else:
                    preview = ev.preview if isinstance(ev, Progress) and ev.preview is not None else gr.skip()
                    yield progress_html(ev), preview, gr.skip(), gr.skip()
        except Exception as err:
            raise _as_user_error(gr, err) from None

    return generate


def _omni_callback(gr, engine: DemoEngine):
    """`run_omni`: runs one Omni task, yielding (status, output image, answer) as it goes."""

    def run_omni(image, task, text, seed, request: gr.Request):
        try:
            events = engine.omni(image, task, text, seed, session=_session(request))
            yield progress_html(None, "Starting…"), gr.skip(), gr.skip()
            for ev in events:
                if isinstance(ev, OmniResult):
                    if ev.stopped:
                        yield progress_html(None, "Stopped."), gr.skip(), gr.skip()
                    elif ev.text is not None:
                        yield progress_html(None, f"{ev.task}: done in {ev.seconds:.1f} s."), None, ev.text
                    else:
                        yield progress_html(None, f"{ev.task}: done in {ev.seconds:.1f} s (seed {ev.seed})."), ev.image, ""
                else:
                    preview = ev.preview if isinstance(ev, Progress) and ev.preview is not None else gr.skip()
                    yield progress_html(ev), preview, gr.skip()
        except Exception as err:
            raise _as_user_error(gr, err) from None

    return run_omni


def _chat_display(gr, history) -> list[dict]:
    """The chat history (content parts) as Chatbot messages: one message per text or image part."""
    shown = []
    for m in history:
        for part in m["content"]:
            if part["type"] == "text":
                shown.append({"role": m["role"], "content": part["text"]})
            else:
                shown.append({"role": m["role"], "content": gr.Image(value=part["image"], format="png")})
    return shown


def _chat_callback(gr, engine: DemoEngine):
    """`chat`: answers one message, yielding (shown conversation, history, message box) as the answer grows."""

    def chat(history, message, max_new_tokens, temperature, top_k, request: gr.Request):
        history = list(history or [])
        message = message or {}
        text, files = message.get("text", ""), message.get("files") or []
        try:
            images = [load_image(f) for f in files]
            events = engine.chat(history, text, images, max_new_tokens, temperature, top_k, session=_session(request))
            user_turn = {"role": "user", "content": (
                ([{"type": "text", "text": text.strip()}] if text and text.strip() else [])
                + [{"type": "image", "image": im} for im in images])}
            shown = _chat_display(gr, [*history, user_turn])
            yield shown + [{"role": "assistant", "content": "…"}], history, gr.MultimodalTextbox(value=None, interactive=False)
            for ev in events:
                if isinstance(ev, ChatResult):
                    if ev.errors:
                        gr.Warning("The model left an image unfinished: " + ev.errors[0])
                    parts = ev.parts or [{"type": "text", "text": "(stopped)" if ev.stopped else "(no answer)"}]
                    new_history = [*history, user_turn, {"role": "assistant", "content": parts}]
                    yield _chat_display(gr, new_history), new_history, gr.MultimodalTextbox(value=None, interactive=True)
                    return
                if isinstance(ev, Waiting):
                    answer = f"(waiting for the model: {ev.ahead} request(s) ahead)"
                else:
                    answer = ev.text.replace(IMAGE_MARKER, " [image] ")
                    if ev.drawing is not None:
                        answer += f" [drawing an image: {ev.drawing} tokens]"
                yield shown + [{"role": "assistant", "content": answer or "…"}], gr.skip(), gr.skip()
        except Exception as err:
            raise _as_user_error(gr, err) from None

    return chat


def _stop_callback(gr, engine: DemoEngine):
    """`stop`: stops the requests of the clicking user's session (the Stop button of every tab)."""

    def stop(request: gr.Request):
        n = engine.stop(_session(request))
        if n:
            gr.Info("Stopping…")

    return stop


def _task_changed_callback(gr):
    """`task_changed`: the Omni text field, shown (and labelled) only for a task that takes text."""

    def task_changed(task):
        need = TASK_TEXT.get(task)
        return gr.Textbox(visible=need is not None, label=(need or "text").capitalize())

    return task_changed


def launch(demo, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           max_file_size: str | int = MAX_FILE_SIZE, **kwargs):
    """Serve a `build_demo` app on `host:port` with the upload limit; says so in the log when the app is
    reachable beyond this machine. Other keyword arguments go to `gradio.Blocks.launch`."""
    notice = exposure_notice(host, share)
    if notice:
        logger.warning(notice)
    logger.info("serving the demo on http://%s:%d (uploads up to %s)", host, port, max_file_size)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                       show_error=False, **kwargs)


__all__ = ["build_demo", "launch"]
