"""CPU tests for `LuminaMGPTProcessor` (SPEC.md sections 3, 4 and 5).

Every expected id sequence here is built by an independent reference written from the SPEC text:
- text ids from our own byte-level table (the tiny vocabulary is byte-level with no merges; checked below),
- the VQ code -> token id map parsed from the token *names* `IMGIMG<letters>Z` of the tokenizer vocabulary
  (the tiny vocabulary orders them by name, so `id == code + 4` is wrong),
- the UniRep span `[8197, 8804 + H/32, 8804 + W/32, row_0, 8803, ..., row_last, 8803, 8196]`,
- the conversation `<s> turn_1 <sep> turn_2 <sep> ...` and its labels.

The tiny VQGAN is slow on CPU, so image tests mostly use 128 / 256 px buckets; the UniRep layout at the
published 512 / 768 / 1024 sizes is checked with placeholder spans (no VQ needed).
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import PIL.Image
import pytest
import torch

import lumina_hf  # noqa: F401  (registers the Auto classes)
from lumina_hf.image_processing_lumina_mgpt import LuminaMGPTImageProcessor
from lumina_hf.processing_lumina_mgpt import (
    OMNI_TASK_PROMPTS,
    DecodedItem,
    LuminaMGPTProcessor,
    MalformedImageSpanError,
    text_to_image_prompt,
)
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

# ---------------------------------------------------------------------------------------------------------------
# Reference implementation (from SPEC.md, independent of the library)
# ---------------------------------------------------------------------------------------------------------------
BOS, PAD, EOS = 0, 1, 2
IMAGE_END, IMAGE_START = 8196, 8197
SEP = 8710  # <reserved08706>
ROW_END = 8803  # <reserved08799>
SIZE0 = 8804  # size token of n grid units = 8804 + n
PLACEHOLDER = 8711  # <image>
MARK = "<|image|>"
IGNORE = -100

_CODE_NAME = re.compile(r"^IMGIMG([A-J]+)Z$")


def ref_code_to_id(vocab: dict[str, int]) -> dict[int, int]:
    """VQ code -> token id, parsed from the token names (letters A..J are the digits 0..9)."""
    out = {}
    for name, tid in vocab.items():
        m = _CODE_NAME.match(name)
        if m:
            out[int("".join(str(ord(c) - ord("A")) for c in m.group(1)))] = int(tid)
    return out


def _gpt2_byte_table() -> dict[int, str]:
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def ref_grid_ids(codes, code_to_id) -> list[list[int]]:
    return [[code_to_id[int(c)] for c in row] for row in torch.as_tensor(codes).tolist()]


def ref_unirep_from_id_grid(id_grid: list[list[int]]) -> list[int]:
    rows, cols = len(id_grid), len(id_grid[0])
    height, width = rows * 16, cols * 16  # VQ factor 16
    assert height % 32 == 0 and width % 32 == 0
    out = [IMAGE_START, SIZE0 + height // 32, SIZE0 + width // 32]
    for row in id_grid:
        assert len(row) == cols
        out += list(row) + [ROW_END]
    return out + [IMAGE_END]


def ref_unirep(codes, code_to_id) -> list[int]:
    """A (rows, cols) grid of VQ codes -> the UniRep span (SPEC.md section 4)."""
    return ref_unirep_from_id_grid(ref_grid_ids(codes, code_to_id))


def ref_placeholder_span(height: int, width: int) -> list[int]:
    return ref_unirep_from_id_grid([[PLACEHOLDER] * (width // 16) for _ in range(height // 16)])


def ref_buckets(target: int) -> list[tuple[int, int]]:
    n = (target // 32) ** 2
    wp, hp, out = n, 1, []
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= 4:
            out.append((wp * 32, hp * 32))
        if (hp + 1) * wp <= n:
            hp += 1
        else:
            wp -= 1
    return out


def ref_bucket(width: int, height: int, target: int) -> tuple[int, int]:
    def key(s):
        rw, rh = s[0] / width, s[1] / height
        return (min(rw, rh) / max(rw, rh), s)

    return max(ref_buckets(target), key=key)


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [x * 200 // max(width - 1, 1), y * 200 // max(height - 1, 1), (x + y) * 200 // max(width + height - 2, 1)], -1
    )
    arr = np.clip(base + rng.randint(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)
    img = PIL.Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        alpha = np.clip(x * 255 // max(width - 1, 1), 0, 255).astype(np.uint8)  # 0 .. 255: partly transparent
        img = PIL.Image.fromarray(np.dstack([arr, alpha]), "RGBA")
    elif mode == "P":
        img = img.quantize(colors=16)
    elif mode != "RGB":
        img = img.convert(mode)
    assert img.mode == mode
    return img


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def proc() -> LuminaMGPTProcessor:
    return build_tiny_processor(256)


@pytest.fixture(scope="module")
def tok(proc):
    return proc.tokenizer


def with_target(proc: LuminaMGPTProcessor, target: int) -> LuminaMGPTProcessor:
    """The same tokenizer with an image processor for another bucket family (building the tokenizer is slow)."""
    return LuminaMGPTProcessor(image_processor=LuminaMGPTImageProcessor(target_size=target), tokenizer=proc.tokenizer)


@pytest.fixture(scope="module")
def proc128(proc):
    return with_target(proc, 128)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


@pytest.fixture(scope="module")
def code_to_id(tok) -> dict[int, int]:
    return ref_code_to_id(tok.get_vocab())


@pytest.fixture(scope="module")
def T(tok):
    """Reference text tokenization: one token per UTF-8 byte through the GPT-2 byte table."""
    vocab = tok.get_vocab()
    byte_id = {b: vocab[ch] for b, ch in _gpt2_byte_table().items()}
    return lambda s: [byte_id[b] for b in s.encode("utf-8")]


def ref_span(proc, model, code_to_id, image) -> list[int]:
    """UniRep span of one image from the model's own VQ codes and our name-parsed map."""
    pixels = proc.image_processor([image])["pixel_values"]
    pixels = pixels[0] if isinstance(pixels, list) else pixels[0]
    codes = model.model.vqmodel.encode_to_codes(pixels.unsqueeze(0))[0]
    return ref_unirep(codes, code_to_id)


def unpadded(batch, i: int, key: str = "input_ids") -> list[int]:
    mask = batch["attention_mask"][i].bool()
    return batch[key][i][mask].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary sanity: our references are meaningful
# ---------------------------------------------------------------------------------------------------------------
def test_reference_vocabulary(proc, tok, code_to_id, T):
    assert len(code_to_id) == 8192 and set(code_to_id) == set(range(8192))
    assert sorted(code_to_id.values()) == list(range(4, 8196))
    assert any(tid != code + 4 for code, tid in code_to_id.items()), "tiny vocab must not satisfy id == code + 4"
    assert code_to_id[123] == tok.convert_tokens_to_ids("IMGIMGBCDZ")
    # the processor's id -> code map is the inverse of ours
    assert proc.image_code_token_ids == {tid: code for code, tid in code_to_id.items()}
    # special ids (SPEC.md section 4)
    assert (proc.bos_token_id, proc.pad_token_id, proc.separator_token_id) == (BOS, PAD, SEP)
    assert (proc.image_start_token_id, proc.image_end_token_id, proc.row_end_token_id) == (IMAGE_START, IMAGE_END, ROW_END)
    assert proc.size_token_base_id == 8804 and proc.image_placeholder_token_id == PLACEHOLDER
    assert tok.convert_tokens_to_ids("<reserved08706>") == SEP and tok.convert_tokens_to_ids("<reserved08812>") == 8816
    # the tiny text vocabulary is byte level without merges: our byte table is the tokenizer
    for s in ["hello world", " A cat.\nYes", "größe 768x768", "  two spaces"]:
        assert tok(s, add_special_tokens=False)["input_ids"] == T(s)


# ---------------------------------------------------------------------------------------------------------------
# UniRep layout
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target,length", [(512, 1060), (768, 2356), (1024, 4164)])
def test_square_layout_and_length(proc, T, target, length):
    p = with_target(proc, target)
    span = p.placeholder_ids(target, target)
    units, cols = target // 32, target // 16
    assert len(span) == length == (target // 16) * (cols + 1) + 4
    assert span[:3] == [IMAGE_START, SIZE0 + units, SIZE0 + units]
    assert span[-2:] == [ROW_END, IMAGE_END]
    body = span[3:-1]
    for r in range(target // 16):
        row = body[r * (cols + 1) : (r + 1) * (cols + 1)]
        assert row[:-1] == [PLACEHOLDER] * cols and row[-1] == ROW_END
    assert span == ref_placeholder_span(target, target)
    assert p.image_prefix_ids(target, target) == span[:3]
    # the whole processor call on a TxT image lays out the same span (transformers-style, no VQ)
    out = p(text="x", images=[PIL.Image.new("RGB", (target, target), (10, 20, 30))])
    assert out["input_ids"][0].tolist() == [BOS] + span + T(" x") + [SEP]
    assert tuple(out["pixel_values"][0].shape) == (3, target, target)


def test_non_square_layout(proc, T):
    p = with_target(proc, 512)
    span = p.placeholder_ids(256, 1024)  # H=256, W=1024: height token first
    assert span[:3] == [IMAGE_START, SIZE0 + 8, SIZE0 + 32]
    assert len(span) == 16 * (64 + 1) + 4
    assert span == ref_placeholder_span(256, 1024)
    tall = p.placeholder_ids(1024, 256)
    assert tall[:3] == [IMAGE_START, SIZE0 + 32, SIZE0 + 8] and len(tall) == 64 * 17 + 4
    assert tall == ref_placeholder_span(1024, 256)
    # a 4:1 input lands in the 1024x256 bucket at 512 and gets that span
    out = p(text="wide", images=[make_image(2048, 512)])
    assert tuple(out["pixel_values"][0].shape) == (3, 256, 1024)
    assert out["input_ids"][0].tolist() == [BOS] + span + T(" wide") + [SEP]


@pytest.mark.parametrize("target,count", [(512, 49), (768, 73), (1024, 97)])
def test_every_bucket_span(proc, target, count):
    p = with_target(proc, target)
    buckets = ref_buckets(target)
    assert len(buckets) == count
    for w, h in buckets:
        assert p.placeholder_ids(h, w) == ref_placeholder_span(h, w), (w, h)


def test_unirep_ids_from_grid(proc, code_to_id):
    codes = torch.arange(4 * 6).view(4, 6) * 37 % 8192  # 96x64 px: W=96, H=64
    id_grid = torch.tensor(ref_grid_ids(codes, code_to_id))
    span = proc.unirep_ids(id_grid)
    assert span == ref_unirep(codes, code_to_id)
    assert span[:3] == [IMAGE_START, SIZE0 + 2, SIZE0 + 3]
    with pytest.raises(ValueError, match="grid"):
        proc.unirep_ids(id_grid.flatten())
    with pytest.raises(ValueError, match="multiple"):
        proc.size_token_id(48)


# ---------------------------------------------------------------------------------------------------------------
# Images through the VQGAN: processor ids == reference ids; vq_model= path == placeholders + fill
# ---------------------------------------------------------------------------------------------------------------
IMAGE_SET = [
    ("square", (300, 300), "RGB"),
    ("2:1", (400, 200), "RGB"),
    ("1:3", (100, 300), "RGB"),
    ("tiny", (40, 33), "RGB"),
    ("large", (1700, 1300), "RGB"),
    ("rgba", (200, 160), "RGBA"),
    ("palette", (180, 240), "P"),
    ("gray", (256, 256), "L"),
]


@pytest.mark.parametrize("target", [128, 256])
def test_image_set_matches_reference(proc, model, code_to_id, T, target):
    proc = with_target(proc, target)
    # the tiny VQGAN is slow on CPU: every image at 128 px buckets, a few at 256
    image_set = IMAGE_SET if target == 128 else [IMAGE_SET[i] for i in (1, 3, 5)]
    images = [make_image(w, h, mode, seed=i) for i, (_, (w, h), mode) in enumerate(image_set)]
    spans = []
    for (name, (w, h), _), img in zip(image_set, images):
        span = ref_span(proc, model, code_to_id, img)
        bw, bh = ref_bucket(w, h, target)
        assert span[:3] == [IMAGE_START, SIZE0 + bh // 32, SIZE0 + bw // 32], name
        assert len(span) == (bh // 16) * (bw // 16 + 1) + 4, name
        assert len(set(span[3:-1]) - {ROW_END}) > 1, f"{name}: degenerate VQ codes make the test weak"
        spans.append(span)

    # offline path: final ids. No markers: every image goes at the start of the first user turn as "<|image|> ".
    text = "Describe these."
    out = proc(text=text, images=images, vq_model=model)
    assert "pixel_values" not in out
    expected = [BOS]
    for span in spans:
        expected += span + T(" ")
    expected = expected[:-1] + T(" " + text) + [SEP]
    got = out["input_ids"][0].tolist()
    assert len(got) == len(expected)
    pos = 1
    for (name, _, _), span in zip(image_set, spans):  # span by span for a readable failure
        assert got[pos : pos + len(span)] == span, name
        pos += len(span) + 1
    assert got == expected

    # transformers path: placeholders + pixel_values, filled by the model -> identical ids
    lazy = proc(text=text, images=images)
    assert len(lazy["pixel_values"]) == len(images)
    n_codes = sum(sum(1 for t in s if t not in (IMAGE_START, IMAGE_END, ROW_END)) - 2 for s in spans)
    assert int((lazy["input_ids"] == PLACEHOLDER).sum()) == n_codes
    filled, _ = model.fill_image_placeholders(lazy["input_ids"], lazy["pixel_values"])
    assert filled[0].tolist() == got
    assert torch.equal(lazy["attention_mask"], out["attention_mask"])

    # encode_images gives the same spans
    assert proc.encode_images([images[1]], model) == [spans[1]]


# ---------------------------------------------------------------------------------------------------------------
# Conversation format
# ---------------------------------------------------------------------------------------------------------------
def test_single_prompt_format(proc, T):
    out = proc(text="a red fox")
    assert out["input_ids"].tolist() == [[BOS] + T("a red fox") + [SEP]]
    assert out["attention_mask"].tolist() == [[1] * (len(T("a red fox")) + 2)]
    assert "labels" not in out
    assert proc(text="a red fox", return_tensors=None)["input_ids"] == [[BOS] + T("a red fox") + [SEP]]


def test_multi_turn_no_role_words(proc, T):
    conv = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "How are you?"},
    ]
    ids = proc(conversations=conv)["input_ids"][0].tolist()
    expected = [BOS] + T("Hello") + [SEP] + T("Hi there") + [SEP] + T("How are you?") + [SEP]
    assert ids == expected
    assert ids[-1] == SEP and ids[-1 - len(T("How are you?")) - 1] == SEP  # prompt ends right after the last user sep
    text = proc.apply_chat_template(conv, tokenize=False)
    assert text == "<s>Hello<reserved08706>Hi there<reserved08706>How are you?<reserved08706>"
    assert proc.tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert proc.decode(ids, skip_special_tokens=False) == text
    templ = proc.apply_chat_template(conv)
    assert templ["input_ids"][0].tolist() == expected
    # original-format roles and content parts give the same ids
    same = [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "user", "content": "How are you?"},
    ]
    assert proc(conversations=same)["input_ids"][0].tolist() == expected
    raw = {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there"},
                             {"from": "human", "value": "How are you?"}]}
    assert proc(conversations=raw)["input_ids"][0].tolist() == expected
    turns, images = proc.normalize_conversation(raw)
    assert turns == [("user", "Hello"), ("assistant", "Hi there"), ("user", "How are you?")] and images == []
    with pytest.raises(ValueError, match="turn 1 has role 'bot'"):
        proc.normalize_conversation([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ValueError, match="system"):
        proc(conversations=[{"role": "system", "content": "x"}, *conv])


def test_markers_replaced_in_order(proc128, T):
    a, b = make_image(200, 100, seed=1), make_image(60, 200, seed=2)  # different buckets -> different spans
    out = proc128(text="Compare <|image|> and <|image|> now", images=[a, b])
    sa = ref_placeholder_span(*proc128.image_processor([a])["pixel_values"].shape[-2:])
    sb = ref_placeholder_span(*proc128.image_processor([b])["pixel_values"].shape[-2:])
    assert sa != sb
    assert out["input_ids"][0].tolist() == [BOS] + T("Compare ") + sa + T(" and ") + sb + T(" now") + [SEP]
    swapped = proc128(text="Compare <|image|> and <|image|> now", images=[b, a])
    assert swapped["input_ids"][0].tolist() == [BOS] + T("Compare ") + sb + T(" and ") + sa + T(" now") + [SEP]
    # the same with chat content parts carrying the images
    conv = [{"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image", "image": a},
        {"type": "text", "text": " and "}, {"type": "image", "image": b}, {"type": "text", "text": " now"}]}]
    parts = proc128(conversations=conv)
    assert torch.equal(parts["input_ids"], out["input_ids"])
    assert all(torch.equal(x, y) for x, y in zip(parts["pixel_values"], out["pixel_values"]))


def test_images_without_markers_go_first_with_space(proc128, T):
    a, b = make_image(128, 128, seed=3), make_image(256, 64, seed=4)
    sa, sb = ref_placeholder_span(128, 128), ref_placeholder_span(64, 256)
    one = proc128(text="describe", images=[a])["input_ids"][0].tolist()
    assert one == [BOS] + sa + T(" describe") + [SEP]
    space = T(" ")[0]
    assert one[1 + len(sa)] == space and proc128.tokenizer.convert_ids_to_tokens(space) == "\u0120"  # 'Ġ'
    two = proc128(text="describe", images=[a, b])["input_ids"][0].tolist()
    assert two == [BOS] + sa + T(" ") + sb + T(" describe") + [SEP]
    # multi-turn: only the first user turn gets them
    conv = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second"}]
    ids = proc128(conversations=conv, images=[a])["input_ids"][0].tolist()
    assert ids == [BOS] + sa + T(" first") + [SEP] + T("ok") + [SEP] + T("second") + [SEP]
    # the rendered text shows where they went, with the same rule
    assert proc128.apply_chat_template(conv, tokenize=False, images=[a]) == (
        "<s><|image|> first<reserved08706>ok<reserved08706>second<reserved08706>"
    )
    assert proc128.apply_chat_template([conv, conv[:1]], tokenize=False, images=[[a, b], [b]]) == [
        "<s><|image|> <|image|> first<reserved08706>ok<reserved08706>second<reserved08706>",
        "<s><|image|> first<reserved08706>",
    ]
    templ = proc128.apply_chat_template(conv, images=[a])
    assert templ["input_ids"][0].tolist() == ids
    rendered = proc128.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "x"}]}], tokenize=False
    )
    assert rendered == "<s><|image|>x<reserved08706>"


def test_text_to_image_prompt():
    assert text_to_image_prompt("a cat", 768, 512) == (
        "Generate an image of 768x512 according to the following prompt:\na cat"
    )
    assert text_to_image_prompt("a cat") == "Generate an image according to the following prompt:\na cat"
    with pytest.raises(ValueError):
        text_to_image_prompt("a cat", width=768)
    assert OMNI_TASK_PROMPTS["depth"] == "Depth estimation."
    assert OMNI_TASK_PROMPTS["segmentation"] == "Segmentic segmentation."
    assert OMNI_TASK_PROMPTS["normal"] == "Surface normal estimation."
    assert OMNI_TASK_PROMPTS["pose"] == "Human pose estimation."
    assert OMNI_TASK_PROMPTS["detection"].format(object="dog") == "Detect: dog"
    assert OMNI_TASK_PROMPTS["describe"] == "Describe the image in detail."
    assert OMNI_TASK_PROMPTS["condition"].format(caption="c") == (
        "Generate an image according to the provided image, and according to the following caption:\nc"
    )


def test_text_to_image_prompt_ids(proc, T):
    prompt = text_to_image_prompt("a cat on a mat", 512, 256)
    ids = proc(text=prompt)["input_ids"][0].tolist()
    assert ids == [BOS] + T("Generate an image of 512x256 according to the following prompt:\na cat on a mat") + [SEP]


# ---------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------
def test_labels_multi_turn_multi_image(proc128, model, code_to_id, T):
    imgs = [
        make_image(128, 128, seed=10),
        make_image(260, 130, seed=11),
        make_image(60, 180, seed=12),
        make_image(150, 150, "RGBA", seed=13),
        make_image(100, 120, "P", seed=14),
    ]
    sA, sB, sC, sD, sE = (ref_span(proc128, model, code_to_id, im) for im in imgs)
    conv = [
        {"role": "user", "content": "<|image|> Make it blue."},
        {"role": "assistant", "content": "Here: <|image|>"},
        {"role": "user", "content": "Compare <|image|> with <|image|>."},
        {"role": "assistant", "content": "<|image|>"},
    ]
    user1 = sA + T(" Make it blue.") + [SEP]
    asst1 = T("Here: ") + sB + [SEP]
    user2 = T("Compare ") + sC + T(" with ") + sD + T(".") + [SEP]
    asst2 = sE + [SEP]
    exp_ids = [BOS] + user1 + asst1 + user2 + asst2
    exp_labels = [IGNORE] * (1 + len(user1)) + asst1 + [IGNORE] * len(user2) + asst2

    out = proc128(conversations=conv, images=imgs, vq_model=model, return_labels=True)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert ids == exp_ids
    assert labels == exp_labels
    # assistant images are trained on every token: start, both size tokens, codes, row ends, end, then the sep
    start_b = 1 + len(user1) + len(T("Here: "))
    assert labels[start_b : start_b + len(sB) + 1] == sB + [SEP]
    assert labels[start_b] == IMAGE_START and labels[start_b + len(sB) - 1] == IMAGE_END
    assert labels[-len(sE) - 1 :] == sE + [SEP]
    assert all(lab == IGNORE for lab in labels[: 1 + len(user1)])

    # transformers path: labels carry placeholders that the model fills with the same codes
    lazy = proc128(conversations=conv, images=imgs, return_labels=True)
    assert lazy["labels"][0].tolist().count(PLACEHOLDER) == sum(len(s) for s in (sB, sE)) - sum(
        s.count(ROW_END) + 4 for s in (sB, sE)
    )
    f_ids, _ = model.fill_image_placeholders(lazy["input_ids"], lazy["pixel_values"])
    assert f_ids[0].tolist() == exp_ids
    # placeholders in labels sit only where input_ids have them (assistant images): filling them from the
    # filled ids gives the offline labels
    lazy_labels = lazy["labels"]
    assert bool(((lazy_labels == PLACEHOLDER) <= (lazy["input_ids"] == PLACEHOLDER)).all())
    assert torch.where(lazy_labels == PLACEHOLDER, f_ids, lazy_labels)[0].tolist() == exp_labels


def test_fill_placeholders_with_labels_user_and_assistant_images(proc128, model):
    a, b = make_image(64, 64, seed=70), make_image(64, 128, seed=71)
    conv = [{"role": "user", "content": "<|image|> edit"}, {"role": "assistant", "content": "<|image|>"}]
    lazy = proc128(conversations=conv, images=[a, b], return_labels=True)
    offline = proc128(conversations=conv, images=[a, b], return_labels=True, vq_model=model)
    f_ids, f_labels = model.fill_image_placeholders(lazy["input_ids"], lazy["pixel_values"], lazy["labels"])
    assert torch.equal(f_ids, offline["input_ids"])
    assert torch.equal(f_labels, offline["labels"])


def test_labels_text_only(proc, T):
    conv = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]
    out = proc(conversations=conv, return_labels=True)
    u1, a1, u2, a2 = T("What is 2+2?") + [SEP], T("4") + [SEP], T("And 3+3?") + [SEP], T("6.") + [SEP]
    assert out["input_ids"][0].tolist() == [BOS] + u1 + a1 + u2 + a2
    assert out["labels"][0].tolist() == [IGNORE] * (1 + len(u1)) + a1 + [IGNORE] * len(u2) + a2
    assert out["attention_mask"][0].tolist() == [1] * (1 + len(u1 + a1 + u2 + a2))


def test_labels_text_to_image_training_item(proc128, model, code_to_id, T):
    img = make_image(200, 100, seed=20)
    bw, bh = ref_bucket(200, 100, 128)
    prompt = text_to_image_prompt("a landscape", bw, bh)
    item = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<|image|>"}], "image": [img]}
    out = proc128(conversations=item, vq_model=model, return_labels=True)
    span = ref_span(proc128, model, code_to_id, img)
    user = T(f"Generate an image of {bw}x{bh} according to the following prompt:\na landscape") + [SEP]
    assert out["input_ids"][0].tolist() == [BOS] + user + span + [SEP]
    assert out["labels"][0].tolist() == [IGNORE] * (1 + len(user)) + span + [SEP]


def test_training_json_format_equals_chat(proc128, T, tmp_path):
    a, b = make_image(128, 128, seed=30), make_image(300, 100, seed=31)
    pa, pb = tmp_path / "a.png", tmp_path / "b.png"
    a.save(pa)
    b.save(pb)
    data = [
        {
            "conversations": [
                {"from": "human", "value": "<|image|>\nWhat is this?"},
                {"from": "gpt", "value": "A pattern."},
                {"from": "human", "value": "Draw it wider."},
                {"from": "gpt", "value": "<|image|>"},
            ],
            "image": [str(pa), str(pb)],
        },
        {  # no marker: the image goes at the start of the first human turn
            "conversations": [{"from": "human", "value": "Describe the image in detail."},
                              {"from": "gpt", "value": "Stripes."}],
            "image": [str(pa)],
        },
    ]
    jpath = tmp_path / "data.json"
    jpath.write_text(json.dumps(data))
    loaded = json.loads(jpath.read_text())
    from_json = proc128(conversations=loaded, return_labels=True)

    chats = [
        [
            {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "\nWhat is this?"}]},
            {"role": "assistant", "content": "A pattern."},
            {"role": "user", "content": "Draw it wider."},
            {"role": "assistant", "content": "<|image|>"},
        ],
        [{"role": "user", "content": "Describe the image in detail."}, {"role": "assistant", "content": "Stripes."}],
    ]
    from_chat = proc128(conversations=chats, images=[[b], [a]], return_labels=True)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(from_json[key], from_chat[key]), key
    assert len(from_json["pixel_values"]) == 3
    for x, y in zip(from_json["pixel_values"], from_chat["pixel_values"]):
        assert torch.equal(x, y)
    # the second item starts with "<|image|> " before its text
    ids1 = unpadded(from_json, 1)
    span = ref_placeholder_span(128, 128)
    assert ids1[: 1 + len(span)] == [BOS] + span
    assert ids1[1 + len(span) :] == T(" Describe the image in detail.") + [SEP] + T("Stripes.") + [SEP]
    assert unpadded(from_json, 1, "labels")[-len(T("Stripes.")) - 1 :] == T("Stripes.") + [SEP]


def test_no_trainable_token_is_an_error(proc):
    with pytest.raises(ValueError, match="item 0.*no trainable token"):
        proc(text="only a prompt", return_labels=True)
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    bad = [{"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="item 1.*no trainable token"):
        proc(conversations=[good, bad], return_labels=True)
    proc(conversations=[good, bad])  # fine for generation


# ---------------------------------------------------------------------------------------------------------------
# Batches and padding
# ---------------------------------------------------------------------------------------------------------------
def test_batch_left_padding_for_generation(proc, T):
    texts = ["hi", "a much longer prompt"]
    out = proc(text=texts)
    seqs = [[BOS] + T(t) + [SEP] for t in texts]
    n = max(map(len, seqs))
    assert out["input_ids"].shape == (2, n)
    for i, s in enumerate(seqs):
        assert out["input_ids"][i].tolist() == [PAD] * (n - len(s)) + s
        assert out["attention_mask"][i].tolist() == [0] * (n - len(s)) + [1] * len(s)
    assert proc.batch_decode(out["input_ids"]) == texts
    right = proc(text=texts, padding_side="right")
    assert right["input_ids"][0].tolist() == seqs[0] + [PAD] * (n - len(seqs[0]))


def test_batch_right_padding_for_training(proc, T):
    convs = [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "longer question"}, {"role": "assistant", "content": "longer answer"}],
    ]
    out = proc(conversations=convs, return_labels=True)
    ids = [[BOS] + T("q") + [SEP] + T("a") + [SEP],
           [BOS] + T("longer question") + [SEP] + T("longer answer") + [SEP]]
    labels = [[IGNORE] * 3 + T("a") + [SEP],
              [IGNORE] * (2 + len(T("longer question"))) + T("longer answer") + [SEP]]
    n = max(map(len, ids))
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, n)
    for i in range(2):
        k = len(ids[i])
        assert out["input_ids"][i].tolist() == ids[i] + [PAD] * (n - k)
        assert out["labels"][i].tolist() == labels[i] + [IGNORE] * (n - k)
        assert out["attention_mask"][i].tolist() == [1] * k + [0] * (n - k)


def test_batch_with_images_fill_matches_offline(proc128, model):
    a = make_image(100, 200, seed=40)
    texts = ["<|image|> describe", "no image here, just a long text prompt"]
    lazy = proc128(text=texts, images=[[a], []])
    assert len(lazy["pixel_values"]) == 1
    offline = proc128(text=texts, images=[[a], None], vq_model=model)
    filled, _ = model.fill_image_placeholders(lazy["input_ids"], lazy["pixel_values"])
    assert torch.equal(filled, offline["input_ids"])
    assert torch.equal(lazy["attention_mask"], offline["attention_mask"])
    assert offline["input_ids"][0, 0] == PAD or offline["input_ids"][1, 0] == PAD  # left padded
    with pytest.raises(ValueError, match="2 items but 1 image lists"):
        proc128(text=texts, images=[[a]])


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------
def _id_grid(code_to_id, rows, cols, offset=0, num_codes=64):
    codes = (torch.arange(rows * cols).view(rows, cols) * 7 + offset) % num_codes
    return ref_grid_ids(codes, code_to_id)


def test_decode_text_with_image_markers(proc, code_to_id, T):
    g1, g2 = _id_grid(code_to_id, 8, 8), _id_grid(code_to_id, 4, 16, offset=5)
    s1, s2 = ref_unirep_from_id_grid(g1), ref_unirep_from_id_grid(g2)
    ids = [BOS] + T("Look: ") + s1 + T(" and ") + s2 + [SEP]
    assert proc.decode(ids) == "Look: <|image|> and <|image|>"
    assert proc.decode(torch.tensor(ids), skip_special_tokens=False) == "<s>Look: <|image|> and <|image|><reserved08706>"
    assert proc.batch_decode([ids, [BOS] + T("plain") + [SEP]]) == ["Look: <|image|> and <|image|>", "plain"]
    # two images of different sizes, each parsed by its own size tokens
    grids = proc.extract_image_tokens(ids)
    assert [tuple(g.shape) for g in grids] == [(8, 8), (4, 16)]
    assert grids[0].tolist() == g1 and grids[1].tolist() == g2
    assert proc.extract_image_tokens(torch.tensor(ids)) [1].tolist() == g2
    assert proc.extract_image_tokens([BOS] + T("no image") + [SEP]) == []
    # without a model, postprocess_generation returns the token grids; left padding is ignored
    item = proc.postprocess_generation([[PAD, PAD] + ids])[0]
    assert isinstance(item, DecodedItem)
    assert item.text == "Look: <|image|> and <|image|>" and item.errors == []
    assert [g.tolist() for g in item.images] == [g1, g2]


def test_round_trip_image_to_ids_to_image(proc128, model, code_to_id, T):
    proc = proc128
    img = make_image(300, 200, seed=50)
    bw, bh = ref_bucket(300, 200, 128)
    prompt = text_to_image_prompt("stripes", bw, bh)
    conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "<|image|>"}]
    out = proc(conversations=conv, images=[img], vq_model=model)
    seq = out["input_ids"][0]
    # the reference: the model's codes -> its decoder -> clamp, (x+1)/2*255, truncate
    pixels = proc.image_processor([img])["pixel_values"]
    codes = model.model.vqmodel.encode_to_codes(pixels)
    assert seq.tolist() == [BOS] + T(prompt) + [SEP] + ref_unirep(codes[0], code_to_id) + [SEP]
    ref = ((model.model.vqmodel.decode_codes(codes).clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)[0]

    items = proc.postprocess_generation(seq.unsqueeze(0), model=model)
    assert items[0].errors == [] and items[0].text == prompt + "<|image|>"
    (pil,) = items[0].images
    assert isinstance(pil, PIL.Image.Image) and pil.mode == "RGB" and pil.size == (bw, bh)
    assert np.array_equal(np.asarray(pil), ref.permute(1, 2, 0).numpy())
    grid = proc.extract_image_tokens(seq)[0]
    pt = proc.image_processor.postprocess(model.decode_image_tokens(grid.unsqueeze(0)), "pt")
    assert torch.equal(pt[0], ref)


# ---------------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------------
def test_save_and_load(proc128, tmp_path):
    import transformers

    proc128.save_pretrained(tmp_path)
    loaded = LuminaMGPTProcessor.from_pretrained(tmp_path)
    auto = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(auto) is LuminaMGPTProcessor
    img = make_image(200, 100, seed=60)
    conv = [{"role": "user", "content": "Draw <|image|> again"}, {"role": "assistant", "content": "<|image|> done"}]
    imgs = [img, make_image(64, 64, seed=61)]
    ref = proc128(conversations=conv, images=imgs, return_labels=True)
    ref_text = proc128(text=["a prompt", "another longer prompt"])
    for p in (loaded, auto):
        assert p.image_processor.target_size == 128
        assert p._ids == proc128._ids and p.pad_token_id == proc128.pad_token_id
        out = p(conversations=conv, images=imgs, return_labels=True)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(out[key], ref[key]), key
        assert all(torch.equal(x, y) for x, y in zip(out["pixel_values"], ref["pixel_values"]))
        txt = p(text=["a prompt", "another longer prompt"])
        assert torch.equal(txt["input_ids"], ref_text["input_ids"])
        assert p.decode(ref["input_ids"][0]) == proc128.decode(ref["input_ids"][0])


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_marker_image_count_mismatch(proc128):
    a, b = make_image(64, 64), make_image(64, 64, seed=1)
    with pytest.raises(ValueError, match=r"item 0.*2 <\|image\|> marker.*1 image"):
        proc128(text="<|image|> and <|image|>", images=[a])
    with pytest.raises(ValueError, match=r"item 0.*1 <\|image\|> marker.*2 image"):
        proc128(text="one <|image|>", images=[a, b])
    with pytest.raises(ValueError, match=r"item 0.*1 <\|image\|> marker.*0 image"):
        proc128(text="one <|image|>")
    with pytest.raises(ValueError, match=r"item 1.*marker"):
        proc128(text=["<|image|> ok", "<|image|> <|image|> bad"], images=[[a], [b]])
    with pytest.raises(ValueError, match="no user turn"):
        proc128(conversations=[{"role": "assistant", "content": "x"}], images=[a])


@pytest.mark.parametrize("target", [500, 0, 16, -512, 512.0])
def test_unsupported_target_size(proc, target):
    with pytest.raises(ValueError, match="target_size"):
        LuminaMGPTImageProcessor(target_size=target)


def test_bad_images(proc128, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    make_image(200, 200).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    good = make_image(64, 64)
    cases = [
        (str(corrupt), "could not be read"),
        (str(empty), "could not be read"),
        (str(truncated), "could not be read"),
        (b"\x89PNG garbage", "could not be read"),
        (PIL.Image.new("RGB", (0, 0)), "empty"),
        (PIL.Image.new("RGB", (0, 64)), "empty"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (make_image(31, 200), "too small"),
        (make_image(200, 20), "too small"),
        ("/nonexistent/dir/img.png", "could not be read"),
    ]
    for bad, problem in cases:
        with pytest.raises(ValueError, match=rf"item 0: image 1\b.*{problem}"):
            proc128(text="<|image|> then <|image|>", images=[good, bad])
        with pytest.raises(ValueError, match=rf"item 1: image 0\b.*{problem}"):
            proc128(text=["fine", "bad"], images=[[good], [bad]])
    # the smallest accepted side is 32 px
    out = proc128(text="tiny", images=[make_image(32, 40)])
    assert len(out["pixel_values"]) == 1


def test_max_length(proc, T):
    with pytest.raises(ValueError, match="item 0.*max_length"):
        proc(text="a fairly long prompt", max_length=5)
    assert proc(text="ok", max_length=4)["input_ids"].shape == (1, 4)


def _malformed(good: list[int], code_to_id) -> dict[str, list[int]]:
    """Variants of a good 64x64 span (a 4x4 grid) that break the UniRep layout."""
    first_row_end = good.index(ROW_END)
    return {
        "truncated": good[: len(good) // 2],
        "cut_before_sizes": good[:2],
        "missing_row_end": good[:first_row_end] + good[first_row_end + 1 :],
        "missing_end": good[:-1],
        "end_replaced": good[:-1] + [SEP],
        "non_image_id_in_grid": good[:4] + [9300] + good[5:],
        "special_in_grid": good[:5] + [SEP] + good[6:],
        "height_zero": [IMAGE_START, SIZE0, good[2]] + good[3:],
        "size_below_base": [IMAGE_START, 100, good[2]] + good[3:],
        "width_too_large": [IMAGE_START, good[1], SIZE0 + 500] + good[3:],
        "size_mismatch": [IMAGE_START, SIZE0 + 3, good[2]] + good[3:],  # says 96 px high, grid is 64
    }


def test_malformed_spans(proc, model, code_to_id, T):
    good_grid = _id_grid(code_to_id, 4, 4)
    good = ref_unirep_from_id_grid(good_grid)
    assert len(good) == 4 * 5 + 4
    assert proc.extract_image_tokens(good)[0].tolist() == good_grid
    other = ref_unirep_from_id_grid(_id_grid(code_to_id, 2, 4, offset=3))  # 64x32 image
    for name, bad in _malformed(good, code_to_id).items():
        seq = [BOS] + T("x") + [SEP] + bad + [SEP]
        if name in ("truncated", "cut_before_sizes", "missing_end"):
            seq = [BOS] + T("x") + [SEP] + bad  # generation stopped inside the span
        with pytest.raises(MalformedImageSpanError):
            proc.extract_image_tokens(seq)
        assert issubclass(MalformedImageSpanError, ValueError)
        # decode never raises; a marker stands only where an image is returned, so the bad span has none
        assert "<|image|>" not in proc.decode(seq), name
        # a batch with one malformed and one good sequence: the good one keeps its images
        items = proc.postprocess_generation([seq, [BOS] + T("y") + [SEP] + other + [SEP]])
        assert len(items[0].errors) == 1 and items[0].images == [], name
        assert items[1].errors == [] and [g.tolist() for g in items[1].images] == [
            _id_grid(code_to_id, 2, 4, offset=3)
        ], name
    # with a model: the good image is decoded, the bad one reported
    seq_bad = [BOS] + T("x") + [SEP] + _malformed(good, code_to_id)["missing_row_end"] + [SEP]
    items = proc.postprocess_generation([seq_bad, [BOS] + T("y") + [SEP] + other + [SEP]], model=model)
    assert len(items[0].errors) == 1 and "row" in items[0].errors[0] and items[0].images == []
    assert items[1].errors == [] and len(items[1].images) == 1 and items[1].images[0].size == (64, 32)


def test_malformed_span_does_not_hide_later_images(proc, code_to_id, T):
    """One malformed span in a sequence: the other spans of that sequence are still returned."""
    good = ref_unirep_from_id_grid(_id_grid(code_to_id, 4, 4))
    other_grid = _id_grid(code_to_id, 2, 4, offset=3)
    other = ref_unirep_from_id_grid(other_grid)
    for name, bad in _malformed(good, code_to_id).items():
        if name in ("cut_before_sizes",):
            continue
        seq = [BOS] + T("x") + [SEP] + bad + T(" then ") + other + [SEP]
        item = proc.postprocess_generation([seq])[0]
        assert len(item.errors) == 1, name
        assert [g.tolist() for g in item.images] == [other_grid], name
        assert item.text.endswith("<|image|>"), name
