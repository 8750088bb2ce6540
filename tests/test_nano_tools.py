"""The nano model's building blocks: shapes data and scorers, the compact tokenizer, the VQGAN trainer and the
build steps (init / export), on small settings."""

import numpy as np
import pytest
import torch

from lumina_hf import LuminaMGPTPipeline, text_to_image_prompt
from lumina_hf.image_processing_lumina_mgpt import generate_buckets
from examples.nano.shapes import COLORS, SHAPES, analyze_image, aspect_size, draw_shape, make_item, mask_iou
from lumina_hf.testing_utils import build_compact_tokenizer


def test_aspect_sizes_are_buckets():
    for target in (64, 96):
        buckets = generate_buckets(target)
        for aspect, ratio in (("1:1", 1.0), ("2:1", 2.0), ("1:2", 0.5)):
            w, h = aspect_size(aspect, target)
            assert (w, h) in buckets and w / h == ratio


@pytest.mark.parametrize("shape", SHAPES)
def test_scorer_reads_back_drawn_shapes(shape):
    for i, (color, bg) in enumerate([("red", "blue"), ("white", "black"), ("yellow", "green")]):
        img, mask = draw_shape(shape, color, bg, (96, 96))
        a = analyze_image(img)
        assert (a.background, a.color, a.shape) == (bg, color, shape)
        assert mask_iou(mask, mask) == 1.0
    # a noise image is not read as a clean shape of the right kind and colors for every draw
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    from PIL import Image

    a = analyze_image(Image.fromarray(noise))
    assert a.fill_ratio < 0.9 or a.shape != "square" or a.color is None


def test_scorer_ignores_stray_pixels_away_from_the_shape():
    # a generated image may carry specks of the shape color elsewhere; the shape is the largest connected
    # region, so a speck in a corner must not stretch the bounding box (it would read a circle as a triangle)
    from PIL import Image

    for shape in SHAPES:
        img, _ = draw_shape(shape, "red", "blue", (96, 96))
        arr = np.array(img)
        arr[2:5, 90:93] = COLORS["red"]
        arr[88:91, 3:6] = COLORS["red"]
        a = analyze_image(Image.fromarray(arr))
        assert (a.background, a.color, a.shape) == ("blue", "red", shape)
        assert a.mask[3, 91] == 0 and a.mask.sum() == (np.array(img) == COLORS["red"]).all(-1).sum()


def test_items_are_reproducible_and_varied():
    a, b = make_item(5, seed=3), make_item(5, seed=3)
    assert a.caption == b.caption and np.array_equal(np.array(a.image), np.array(b.image))
    captions = {make_item(i).caption for i in range(200)}
    assert len(captions) > 50
    assert all(make_item(i).color != make_item(i).background for i in range(50))
    assert {make_item(i).color for i in range(200)} == set(COLORS)


def test_mask_iou_partial():
    from PIL import Image

    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    a[:, :5] = 255
    b[:, :4] = 255
    assert mask_iou(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(40 / 50)


def test_compact_tokenizer_keeps_real_ids_and_shortens_prompts():
    corpus = [text_to_image_prompt(make_item(i).caption, 96, 96) for i in range(100)]
    tok = build_compact_tokenizer(corpus, text_vocab_size=400)
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08799>"]) == [
        0, 1, 8197, 8196, 8710, 8803,
    ]
    assert len(tok) < 9200 + 400
    ids = tok(corpus[0], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == corpus[0]
    assert len(ids) < len(corpus[0]) / 3  # trained merges, not bytes
    assert min(ids) >= 9200


def test_vqgan_trainer_learns_and_saves(tmp_path):
    from lumina_hf.modeling_vqgan import LuminaMGPTVQGAN
    from examples.nano.train_vqgan import VQGANTrainingConfig, train_vqgan

    cfg = VQGANTrainingConfig(
        output_dir=str(tmp_path / "vq"), target_sizes=[48], steps=40, batch_size=4, num_embeddings=64,
        channel_multiplier=[1, 1, 1, 1, 1], learning_rate=1e-3, restart_dead_codes_every=10,
    )
    torch.manual_seed(0)
    out = train_vqgan(cfg, progress=False)
    vq = LuminaMGPTVQGAN.from_pretrained(out).eval()
    fresh = LuminaMGPTVQGAN(cfg.vq_config()).eval()
    from lumina_hf.image_processing_lumina_mgpt import pil_to_tensor

    x = torch.stack([pil_to_tensor(make_item(i, seed=99, target_size=48, aspects=("1:1",)).image) for i in range(8)])
    err_trained = (vq.decode_codes(vq.encode_to_codes(x)) - x).abs().mean()
    err_fresh = (fresh.decode_codes(fresh.encode_to_codes(x)) - x).abs().mean()
    assert err_trained < 0.9 * err_fresh
    with pytest.raises(ValueError, match="exists"):
        train_vqgan(cfg, progress=False)



def test_vqgan_decoder_only_refinement_keeps_codes(tmp_path):
    """train_parts='decoder' changes the decoder but not the encoder or codebook: every image keeps its codes
    (so tokenized data and a language model stay valid); it refuses to start without init_from."""
    from lumina_hf.image_processing_lumina_mgpt import pil_to_tensor
    from lumina_hf.modeling_vqgan import LuminaMGPTVQGAN
    from examples.nano.train_vqgan import VQGANTrainingConfig, train_vqgan

    small = dict(target_sizes=[48], batch_size=4, num_embeddings=64, channel_multiplier=[1, 1, 1, 1, 1],
                 restart_dead_codes_every=2)
    first = train_vqgan(VQGANTrainingConfig(output_dir=str(tmp_path / "a"), steps=6, learning_rate=1e-3, **small),
                        progress=False)
    with pytest.raises(ValueError, match="init_from"):
        train_vqgan(VQGANTrainingConfig(output_dir=str(tmp_path / "x"), train_parts="decoder", **small), progress=False)
    with pytest.raises(ValueError, match="train_parts"):
        train_vqgan(VQGANTrainingConfig(output_dir=str(tmp_path / "x"), train_parts="encoder", init_from=first, **small),
                    progress=False)
    assert not (tmp_path / "x").exists()
    out = train_vqgan(VQGANTrainingConfig(output_dir=str(tmp_path / "b"), steps=30, learning_rate=1e-3, init_from=first,
                                          train_parts="decoder", **small), progress=False)
    a, b = LuminaMGPTVQGAN.from_pretrained(first).eval(), LuminaMGPTVQGAN.from_pretrained(out).eval()
    for name, pa in a.named_parameters():
        pb = dict(b.named_parameters())[name]
        frozen = name.startswith(("encoder.", "quant_conv.", "quantize."))
        assert torch.equal(pa, pb) == frozen, name
    x = torch.stack([pil_to_tensor(make_item(i, seed=99, target_size=48, aspects=("1:1",)).image) for i in range(8)])
    codes = a.encode_to_codes(x)
    assert torch.equal(codes, b.encode_to_codes(x))
    err_a = (a.decode_codes(codes) - x).abs().mean()
    err_b = (b.decode_codes(codes) - x).abs().mean()
    assert err_b < err_a

def test_vqgan_lr_schedule():
    from examples.nano.train_vqgan import VQGANTrainingConfig

    cfg = VQGANTrainingConfig(output_dir="x", steps=110, learning_rate=1e-3, lr_warmup_steps=10, lr_schedule="cosine",
                              min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway through the decay
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 1e-4
    assert VQGANTrainingConfig(output_dir="x").lr_at(500) == 5e-4  # constant by default


def test_vqgan_continues_bf16_with_checkpoints(tmp_path):
    from lumina_hf.modeling_vqgan import LuminaMGPTVQGAN
    from examples.nano.train_vqgan import VQGANTrainingConfig, train_vqgan

    small = dict(target_sizes=[48], batch_size=2, num_embeddings=64, channel_multiplier=[1, 1, 1, 1, 1])
    first = train_vqgan(VQGANTrainingConfig(output_dir=str(tmp_path / "a"), steps=2, **small), progress=False)
    cfg = VQGANTrainingConfig(output_dir=str(tmp_path / "b"), steps=4, init_from=first, bf16=True, save_every=2,
                              restart_dead_codes_every=0, **small)
    out = train_vqgan(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "b-checkpoints").iterdir()) == ["step-2"]
    a, b = LuminaMGPTVQGAN.from_pretrained(first), LuminaMGPTVQGAN.from_pretrained(out)
    assert next(b.parameters()).dtype == torch.float32
    # continued from `first` (the codebook was not re-initialised) and trained further
    assert torch.allclose(a.quantize.embedding.weight, b.quantize.embedding.weight, atol=0.05)
    assert not torch.equal(a.decoder.conv_out.weight, b.decoder.conv_out.weight)
    wrong = VQGANTrainingConfig(output_dir=str(tmp_path / "c"), steps=1, init_from=first,
                                **{**small, "num_embeddings": 32})
    with pytest.raises(ValueError, match="num_embeddings"):
        train_vqgan(wrong, progress=False)
    assert not (tmp_path / "c").exists()


def test_vqgan_config_rejects_unknown_keys(tmp_path):
    from examples.nano.train_vqgan import VQGANTrainingConfig

    p = tmp_path / "c.yaml"
    p.write_text("output_dir: x\nstepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        VQGANTrainingConfig.from_yaml(str(p))


def _tiny_nano_init(tmp_path, num_hidden_layers: int) -> None:
    """`tmp_path/vq` (an untrained small VQGAN) and `tmp_path/init` (`init_model` around it, a tiny LM)."""
    from lumina_hf.modeling_vqgan import LuminaMGPTVQGAN
    from examples.nano.build import init_model
    from examples.nano.train_vqgan import VQGANTrainingConfig

    cfg = VQGANTrainingConfig(output_dir="unused", num_embeddings=64, channel_multiplier=[1, 1, 1, 1, 1])
    LuminaMGPTVQGAN(cfg.vq_config()).save_pretrained(tmp_path / "vq")
    init_model(str(tmp_path / "vq"), str(tmp_path / "init"), target_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=num_hidden_layers, num_attention_heads=2, num_key_value_heads=2)


def test_build_init_and_export(tmp_path):
    from lumina_hf.modeling_vqgan import LuminaMGPTVQGAN
    from examples.nano.build import export

    _tiny_nano_init(tmp_path, num_hidden_layers=1)
    pipe = LuminaMGPTPipeline.from_pretrained(tmp_path / "init")
    assert pipe.model.config.vocab_size == len(pipe.processor.tokenizer) < 10_000
    vq = LuminaMGPTVQGAN.from_pretrained(tmp_path / "vq")
    assert all(torch.equal(v, pipe.model.vqmodel.state_dict()[k]) for k, v in vq.state_dict().items())
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle on a blue background", height=64, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 64)
    export(str(tmp_path / "init"), str(tmp_path / "exported"), target_size=96)
    again = LuminaMGPTPipeline.from_pretrained(tmp_path / "exported")
    assert again.processor.image_processor.target_size == 96
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    # the shipped form: LM weights in bf16 (the VQGAN stays fp32), sampling defaults in generation_config
    export(str(tmp_path / "init"), str(tmp_path / "half"), dtype="bfloat16", guidance_scale=2.5, image_top_k=64,
           num_candidates=3)
    half = LuminaMGPTPipeline.from_pretrained(tmp_path / "half", dtype=torch.float32)
    assert half.model.generation_config.guidance_scale == 2.5 and half._default("image_top_k", None) == 64
    assert half._default("num_candidates", None) == 3 and pipe._default("num_candidates", None) == 1
    # without a model-level Omni top-k the image-to-image tasks use the reference's 200
    assert half._default("image_top_k", "segmentation") == 200
    from safetensors import safe_open

    dtypes = {}
    for f in (tmp_path / "half" / "model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            dtypes.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    assert {d for k, d in dtypes.items() if "vqmodel" in k} == {"F32"}
    assert {d for k, d in dtypes.items() if "vqmodel" not in k} == {"BF16"}
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v.to(torch.bfloat16).float() if "vqmodel" not in k else v, half.model.state_dict()[k]), k
    with pytest.raises(ValueError, match="unknown sampling"):
        export(str(tmp_path / "init"), str(tmp_path / "bad"), guidance=2.0)


def test_export_can_store_the_vq_decoder_in_bf16(tmp_path):
    """`vq_decoder_dtype="bfloat16"` halves the stored decoder side only: encoder, quant_conv and codebook stay
    fp32 (same codes), every VQGAN weight loads back as fp32 equal to the stored (rounded) value."""
    from safetensors import safe_open

    from examples.nano.build import export

    _tiny_nano_init(tmp_path, num_hidden_layers=1)
    export(str(tmp_path / "init"), str(tmp_path / "small"), dtype="bfloat16", vq_decoder_dtype="bfloat16",
           temperature=0.3)
    dtypes = {}
    for f in (tmp_path / "small" / "model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            dtypes.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    decoder_side = {k for k in dtypes if ".vqmodel.decoder." in k or ".vqmodel.post_quant_conv." in k}
    assert decoder_side and {dtypes[k] for k in decoder_side} == {"BF16"}
    assert {d for k, d in dtypes.items() if "vqmodel" in k and k not in decoder_side} == {"F32"}
    src = LuminaMGPTPipeline.from_pretrained(tmp_path / "init").model
    small = LuminaMGPTPipeline.from_pretrained(tmp_path / "small", dtype=torch.float32)
    got = small.model
    assert {p.dtype for p in got.vqmodel.parameters()} == {torch.float32}
    assert small._default("temperature", None) == 0.3  # a sampling temperature is a valid saved default
    for k, v in src.vqmodel.state_dict().items():
        want = v.to(torch.bfloat16).float() if k.startswith(("decoder.", "post_quant_conv.")) else v
        assert torch.equal(want, got.vqmodel.state_dict()[k]), k
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(src.vqmodel.encode_to_codes(pixels), got.vqmodel.encode_to_codes(pixels))
    with pytest.raises(ValueError, match="vq_decoder_dtype"):
        export(str(tmp_path / "init"), str(tmp_path / "bad"), vq_decoder_dtype="float16")
    assert not (tmp_path / "bad").exists()


def test_grow_keeps_the_function_and_adds_trainable_blocks(tmp_path):
    from examples.nano.build import grow_model

    _tiny_nano_init(tmp_path, num_hidden_layers=2)
    src = LuminaMGPTPipeline.from_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="already has 2 decoder layers"):
        grow_model(str(tmp_path / "init"), str(tmp_path / "same"), num_hidden_layers=2)
    assert not (tmp_path / "same").exists()
    grow_model(str(tmp_path / "init"), str(tmp_path / "grown"), num_hidden_layers=5)
    with pytest.raises(ValueError, match="exists"):
        grow_model(str(tmp_path / "init"), str(tmp_path / "grown"), num_hidden_layers=6)
    grown = LuminaMGPTPipeline.from_pretrained(tmp_path / "grown")
    assert grown.model.config.num_hidden_layers == 5
    # trained blocks spread evenly (new index i * 5 // 2): 0 -> 0, 1 -> 2
    for new_i, old_i in ((0, 0), (2, 1)):
        for k, v in src.model.model.layers[old_i].state_dict().items():
            assert torch.equal(v, grown.model.model.layers[new_i].state_dict()[k]), k
    for new_i in (1, 3, 4):
        block = grown.model.model.layers[new_i]
        assert not block.self_attn.o_proj.weight.any() and not block.mlp.down_proj.weight.any()
        assert block.self_attn.q_proj.weight.std() > 0
    ids = torch.randint(0, src.model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = src.model(input_ids=ids).logits
        b = grown.model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the new blocks learn: one gradient step through the grown model reaches their zeroed outputs
    grown.model.train()
    loss = grown.model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert grown.model.model.layers[1].self_attn.o_proj.weight.grad.abs().sum() > 0
    assert grown.model.model.layers[4].mlp.down_proj.weight.grad.abs().sum() > 0


def test_exported_omni_top_k_drives_image_to_image_sampling(tmp_path):
    """`export(omni_image_top_k=1)` makes segmentation greedy (seed-independent); text-to-image keeps its own top-k;
    without it, the reference's top-k 200 samples and the seed matters."""
    from examples.nano.build import export

    _tiny_nano_init(tmp_path, num_hidden_layers=1)
    export(str(tmp_path / "init"), str(tmp_path / "greedy"), target_size=64, omni_image_top_k=1, omni_guidance_scale=1.5)
    item = make_item(0, seed=1, target_size=64)

    def seg_tokens(folder, seed):
        pipe = LuminaMGPTPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(seed)
        return pipe(image=item.image, task="segmentation", generator=gen, output_type="latent").images

    assert torch.equal(seg_tokens(tmp_path / "greedy", 0), seg_tokens(tmp_path / "greedy", 1))
    assert not torch.equal(seg_tokens(tmp_path / "init", 0), seg_tokens(tmp_path / "init", 1))
    pipe = LuminaMGPTPipeline.from_pretrained(tmp_path / "greedy")
    assert pipe._default("image_top_k", "segmentation") == 1 and pipe._default("image_top_k", None) == 2000
    assert pipe._default("guidance_scale", "segmentation") == 1.5 and pipe._default("guidance_scale", None) == 4.0
    with pytest.raises(ValueError, match="omni_top_k"):
        export(str(tmp_path / "init"), str(tmp_path / "bad"), omni_top_k=1)
    assert not (tmp_path / "bad").exists()
