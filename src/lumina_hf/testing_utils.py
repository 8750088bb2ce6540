"""Tiny builders that keep the real token ids: shared by the tests, benchmarks and docs.

- `build_tiny_tokenizer()`: a 65536-entry vocabulary with `<s>`=0, `<pad>`=1, `</s>`=2, the 8192 image-code
  tokens `IMGIMG...Z` at 4..8195 (in *name-sorted* order, so `id == code + 4` does not hold and code that
  assumes it fails), `<eoss>`=8196, `<racm3:break>`=8197, `<reservedNNNNN>` at NNNNN + 4, `<image>`=8711,
  and a byte-level text vocabulary (no merges) above the reserved block.
- `tiny_config()`: hidden 64, 2 layers, the full vocabulary, a factor-16 VQGAN with base channels 32 and a
  small codebook whose codes map onto the first image-code tokens.
- `build_tiny_model()`, `build_tiny_processor()`.

Nothing here downloads anything.
"""

from __future__ import annotations

import functools

import torch

from .configuration_lumina_mgpt import LuminaMGPTConfig
from .unirep import image_code_token_name

VOCAB_SIZE = 65536
NUM_IMAGE_CODES = 8192
RESERVED_FIRST_ID = 8198  # <reserved08194>
RESERVED_LAST_ID = 9199
TEXT_FIRST_ID = 9200


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _special_vocabulary() -> dict[str, int]:
    """The ids 0..9199: Chameleon's specials, image codes (name-sorted), `<eoss>`, `<racm3:break>`, reserved."""
    vocab: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    names = sorted(image_code_token_name(c) for c in range(NUM_IMAGE_CODES))
    for i, name in enumerate(names):
        vocab[name] = 4 + i
    vocab["<eoss>"] = 8196
    vocab["<racm3:break>"] = 8197
    for tid in range(RESERVED_FIRST_ID, RESERVED_LAST_ID + 1):
        vocab[f"<reserved{tid - 4:05d}>"] = tid
    # Chameleon's image placeholder sits where <reserved08707> would.
    del vocab["<reserved08707>"]
    vocab["<image>"] = 8711
    return vocab


def _special_names() -> list[str]:
    names = ["<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>", "<image>"]
    return names + [f"<reserved{tid - 4:05d}>" for tid in range(RESERVED_FIRST_ID, RESERVED_LAST_ID + 1) if tid != 8711]


@functools.lru_cache(maxsize=1)
def tiny_vocabulary() -> dict[str, int]:
    vocab = _special_vocabulary()
    for i, ch in enumerate(_bytes_to_unicode().values()):
        vocab[ch] = TEXT_FIRST_ID + i
    used = set(vocab.values())
    for tid in range(VOCAB_SIZE):
        if tid not in used:
            vocab[f"<unused{tid}>"] = tid
    assert len(vocab) == VOCAB_SIZE
    return vocab


def _wrap_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _special_names()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_tokenizer():
    """A `PreTrainedTokenizerFast` with the real special ids in a 65536-token vocabulary."""
    return _wrap_tokenizer(dict(tiny_vocabulary()), [])


def build_compact_tokenizer(corpus: list[str], text_vocab_size: int = 512):
    """A tokenizer with the real special ids 0..9199 and a small byte-level BPE text vocabulary trained on
    `corpus` at ids 9200+ (no unused filler): for small models whose `vocab_size` is `len(tokenizer)`."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = _special_vocabulary()
    for name, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab[name] = TEXT_FIRST_ID + i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return _wrap_tokenizer(vocab, merges)


def tiny_vocabulary_map(num_codes: int = NUM_IMAGE_CODES) -> dict[str, int]:
    """name -> id for the image-code tokens (and `<image>`), as a converted config stores it."""
    vocab = tiny_vocabulary()
    out = {image_code_token_name(c): vocab[image_code_token_name(c)] for c in range(NUM_IMAGE_CODES)}
    out["<image>"] = vocab["<image>"]
    return out


def tiny_config(**overrides) -> LuminaMGPTConfig:
    """A 2-layer, hidden-64 Lumina-mGPT config over the full 65536 vocabulary with a tiny VQGAN
    (factor 16, base channels 32, `num_codes` codebook entries, default 64)."""
    num_codes = overrides.pop("num_codes", 64)
    vq = dict(
        embed_dim=32,
        num_embeddings=num_codes,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 2, 2, 4],
        num_res_blocks=1,
        attn_resolutions=[],
        resolution=64,
    )
    vq.update(overrides.pop("vq_config", {}))
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        vocabulary_map=tiny_vocabulary_map(),
        vq_config=vq,
    )
    kwargs.update(overrides)
    return LuminaMGPTConfig(**kwargs)


def build_tiny_model(seed: int = 0, **overrides):
    """A randomly initialised tiny `LuminaMGPTForConditionalGeneration` (fp32, eval mode)."""
    from .modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration

    torch.manual_seed(seed)
    model = LuminaMGPTForConditionalGeneration(tiny_config(**overrides))
    return model.eval()


def build_tiny_processor(target_size: int = 256, **kwargs):
    """A `LuminaMGPTProcessor` with the tiny tokenizer and an image processor for `target_size` buckets."""
    from .image_processing_lumina_mgpt import LuminaMGPTImageProcessor
    from .processing_lumina_mgpt import LuminaMGPTProcessor

    return LuminaMGPTProcessor(
        image_processor=LuminaMGPTImageProcessor(target_size=target_size),
        tokenizer=build_tiny_tokenizer(),
        **kwargs,
    )


__all__ = [
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "tiny_config",
    "tiny_vocabulary",
    "tiny_vocabulary_map",
]
