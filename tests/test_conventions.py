"""The conventions transformers and diffusers users (and their tools) rely on, held by our classes: tuple outputs,
images through every entry point, save/load arguments, config round trips, processor keyword checking, the
pipeline callback contract, paired image markers when decoding, and a decode path free of deprecated calls."""

import warnings

import PIL.Image
import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText

import lumina_hf  # noqa: F401  (registers the Auto classes)
from lumina_hf import LuminaMGPTConfig, LuminaMGPTForConditionalGeneration, LuminaMGPTModel, LuminaMGPTPipeline
from lumina_hf.generation_lumina_mgpt import generate_image_tokens
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET = 32


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=3)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(TARGET)


def image(color="red", size=(TARGET, TARGET)):
    return PIL.Image.new("RGB", size, color)


def ids():
    return torch.tensor([[0, 11, 12, 13, 8710, 8197, 8806, 8806, 4, 5, 8803, 6, 7, 8803]])


# ------------------------------------------------------------------ return_dict
def test_return_dict_false_gives_tuples(model):
    x = ids()
    labels = x.clone()
    with torch.no_grad():
        full = model(x, labels=labels)
        out = model(x, labels=labels, return_dict=False)
        assert isinstance(out, tuple)
        assert torch.equal(out[0], full.loss) and torch.equal(out[1], full.logits)
        base = model.model(x, return_dict=False)
        assert isinstance(base, tuple) and torch.equal(base[0], model.model(x).last_hidden_state)
        model.config.return_dict = False
        try:
            assert isinstance(model(x), tuple) and torch.equal(model(x)[0], full.logits)
            assert isinstance(model.model(x), tuple)
            assert not isinstance(model(x, return_dict=True), tuple)
        finally:
            model.config.return_dict = True


# ------------------------------------------------------------------ images through every entry point
def test_base_model_and_inputs_embeds_take_pixel_values(model, processor):
    batch = processor(text="Describe the image in detail. <|image|>", images=[image("blue")])
    placeholders, pixels = batch["input_ids"], batch["pixel_values"]
    filled, _ = model.fill_image_placeholders(placeholders, pixels)
    assert not torch.equal(filled, placeholders)
    with torch.no_grad():
        reference = model.model(input_ids=filled).last_hidden_state
        # the base model fills placeholders itself, from ids or from embeddings
        torch.testing.assert_close(model.model(input_ids=placeholders, pixel_values=pixels).last_hidden_state, reference)
        embeds = model.get_input_embeddings()(placeholders)
        torch.testing.assert_close(model.model(inputs_embeds=embeds, pixel_values=pixels).last_hidden_state, reference)
        torch.testing.assert_close(model(inputs_embeds=embeds, pixel_values=pixels).logits, model(filled).logits)
    # AutoModel gives the base class, which accepts pixel_values like Chameleon's
    auto = AutoModel.from_config(model.config)
    assert isinstance(auto, LuminaMGPTModel)
    with pytest.raises(ValueError, match="placeholder"):
        model.model(input_ids=filled, pixel_values=pixels)  # no placeholders left for the image


def test_generate_uses_the_image_with_ids_and_with_embeds(model, processor):
    batch = processor(text="Describe the image in detail. <|image|>", images=[image("green")])
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=1)
    from_ids = model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], **kw)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    from_embeds = model.generate(inputs_embeds=embeds, pixel_values=batch["pixel_values"], **kw)
    filled, _ = model.fill_image_placeholders(batch["input_ids"], batch["pixel_values"])
    from_filled = model.generate(input_ids=filled, **kw)
    n = batch["input_ids"].shape[1]
    assert torch.equal(from_ids.sequences, from_filled.sequences)
    assert torch.equal(from_embeds.sequences, from_filled.sequences[:, n:])  # embeds: only new tokens come back
    for a, b in zip(from_embeds.scores, from_filled.scores):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ save / load
def test_pipeline_save_forwards_variant_and_shard_size(tmp_path, model, processor):
    pipe = LuminaMGPTPipeline(model=model, processor=processor)
    pipe.save_pretrained(tmp_path / "v", variant="bf16")
    files = sorted(p.name for p in (tmp_path / "v" / "model").iterdir())
    assert "model.bf16.safetensors" in files and "model.safetensors" not in files
    loaded = LuminaMGPTPipeline.from_pretrained(tmp_path / "v", variant="bf16")
    state = loaded.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    pipe.save_pretrained(tmp_path / "s", max_shard_size="2MB")
    assert (tmp_path / "s" / "model" / "model.safetensors.index.json").is_file()
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "p", safe_serialization=False)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("attn", [None, [], [4]])
def test_config_survives_to_dict_from_dict(attn):
    config = tiny_config(vq_config={"attn_resolutions": attn})
    as_dict = config.to_dict()
    again = LuminaMGPTConfig.from_dict(as_dict)
    assert again.to_dict() == as_dict
    assert again.vq_config.attn_resolutions == attn


def test_vqgan_is_float32_from_construction():
    config = tiny_config()
    for build in (
        lambda: LuminaMGPTForConditionalGeneration._from_config(config, dtype=torch.bfloat16),
        lambda: AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16),
    ):
        m = build()
        assert {p.dtype for p in m.model.vqmodel.parameters()} == {torch.float32}
        assert m.lm_head.weight.dtype == torch.bfloat16 and m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------ processor
def test_processor_rejects_unknown_keyword_arguments(processor):
    with pytest.raises(TypeError, match="max_lenght"):
        processor(text="a red square", max_lenght=3)
    with pytest.raises(TypeError, match="paddding"):
        processor(text=["a", "b"], paddding="left")


def test_processor_takes_a_flat_image_list_for_a_batch(processor):
    texts = ["one <|image|>", "two <|image|> and <|image|>"]
    ims = [image("red"), image("blue"), image("green")]
    flat = processor(text=texts, images=ims)
    nested = processor(text=texts, images=[ims[:1], ims[1:]])
    assert torch.equal(flat["input_ids"], nested["input_ids"])
    assert all(torch.equal(a, b) for a, b in zip(flat["pixel_values"], nested["pixel_values"]))
    one_each = processor(text=["x <|image|>", "y <|image|>"], images=ims[:2])
    assert one_each["input_ids"].shape[0] == 2 and len(one_each["pixel_values"]) == 2
    with pytest.raises(ValueError, match=r"hold 3 <\|image\|> marker"):
        processor(text=texts, images=ims[:2])


# ------------------------------------------------------------------ pipeline callbacks and progress
def test_callback_runs_every_step_and_its_tokens_are_applied(model, processor):
    pipe = LuminaMGPTPipeline(model=model, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    bars = []

    class Bar:  # records what the pipeline reports to its progress bar
        def __init__(self, total):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    pipe.progress_bar = lambda iterable=None, total=None: Bar(total)
    steps = []
    forced = 4 + 17  # an image-code id (tiny vocabulary: codes at 4..67)

    def callback(p, step, timestep, kwargs):
        steps.append(step)
        tokens = kwargs["tokens"].clone()
        if step == 0:
            tokens[:, 0] = forced
        return {"tokens": tokens}

    out = pipe("a red square", height=TARGET, width=TARGET, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
               output_type="latent", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["tokens"])
    total = 2 * (2 + 1) + 1  # 2x2 grid: codes + row ends, then the end token
    assert steps == list(range(total))
    assert bars[0].n == bars[0].total == total
    assert int(out.images[0, 0, 0]) == forced
    # the replaced token is what the model was fed: the rest equals a plain run that was fed the same token
    replay = generate_image_tokens(model, [processor(text=lumina_hf.text_to_image_prompt("a red square", TARGET, TARGET),
                                                     return_tensors=None)["input_ids"][0]],
                                   height=TARGET, width=TARGET, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                                   callback=lambda s, t: t.__setitem__((slice(None), 0), forced) if s == 0 else None)
    assert torch.equal(replay.sequences[0, 3:-1].view(2, 3)[:, :2], out.images[0])


# ------------------------------------------------------------------ decoding
def test_decoding_keeps_markers_paired_with_returned_images(processor):
    good = [8197, 8805, 8805, 4, 5, 8803, 6, 7, 8803, 8196]  # 32x32: a 2x2 grid
    bad_rows = [8197, 8805, 8805, 4, 5, 6, 7, 8, 9, 8196]  # no row ends
    cut = [8197, 8805, 8805, 4, 5]  # unterminated
    seq = [11] + good + [12] + bad_rows + [13] + good + cut
    item = processor.postprocess_generation([seq])[0]
    assert len(item.images) == 2 and len(item.errors) == 2
    assert item.text.count("<|image|>") == len(item.images)
    assert processor.decode(seq).count("<|image|>") == 2


# ------------------------------------------------------------------ deprecations
def test_decode_paths_emit_no_deprecation_warning(model, processor):
    prompt = processor(text=lumina_hf.text_to_image_prompt("a red square", TARGET, TARGET), return_tensors=None)["input_ids"][0]
    batch = processor(text="Describe the image in detail. <|image|>", images=[image("blue")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate_image_tokens(model, [prompt, prompt], height=TARGET, width=TARGET, guidance_scale=3.0,
                              generator=torch.Generator().manual_seed(0))
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=1)
        with torch.no_grad():
            model(ids(), use_cache=True)
    bad = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not bad, bad


def test_the_deprecation_guard_catches_our_deprecated_calls(pytester):
    """The conftest guard fails a test that reaches a deprecated API through lumina_hf code, and only then."""
    import pathlib

    pytester.makeconftest(pathlib.Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(
        """
        import warnings, torch
        from lumina_hf.testing_utils import build_tiny_model

        def test_ours():
            model = build_tiny_model()
            model(torch.tensor([[0, 5]]), past_key_values=None)  # our forward warns: use `cache`

        def test_not_ours():
            warnings.warn("some library's own deprecation", DeprecationWarning)
        """
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*deprecated API used on lumina_hf's code path*", "*FutureWarning via lumina_hf/modeling_lumina_mgpt.py*"])
