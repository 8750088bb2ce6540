"""LuminaMGPTProcessor: the Lumina-mGPT data format (SPEC.md sections 4 and 5).

A conversation is `<s>` then each turn's text followed by `<reserved08706>`, with no role words. `<|image|>`
in a turn marks where the next image goes; the image becomes its UniRep tokens
`[<racm3:break>, size(H), size(W), row_0, <row end>, ..., row_last, <row end>, <eoss>]`.

Two ways to get image codes, with identical ids:
- transformers style: `processor(text=..., images=...)` lays out the exact UniRep span with
  `<image>` placeholders at the code positions and returns `pixel_values`; the model fills in the codes.
- offline: `processor(..., vq_model=model)` (or `processor.encode_images(images, model)`) runs the VQGAN
  here and returns final ids (what the tokenization scripts store).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from .image_processing_lumina_mgpt import LuminaMGPTImageProcessor
from .unirep import MalformedImageSpanError, UniRepLayout, parse_image_code_token_name

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<|image|>"
T2I_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{caption}"
T2I_TEMPLATE_NO_SIZE = "Generate an image according to the following prompt:\n{caption}"

# Omni-SFT instructions (SPEC.md section 5), written as trained (including "Segmentic").
OMNI_TASK_PROMPTS = {
    "depth": "Depth estimation.",
    "segmentation": "Segmentic segmentation.",
    "normal": "Surface normal estimation.",
    "pose": "Human pose estimation.",
    "detection": "Detect: {object}",
    "condition": "Generate an image according to the provided image, and according to the following caption:\n{caption}",
    "describe": "Describe the image in detail.",
}

USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt")


@dataclasses.dataclass
class DecodedItem:
    """One generated sequence, decoded: `text` with one `<|image|>` per returned image, where it was, `images`
    (PIL, numpy or tensors, or token grids when no model is given), and `errors`: one message per malformed
    span (that span is left out of `text` and `images`; the other spans and items are unaffected)."""

    text: str
    images: list[Any]
    errors: list[str]


def text_to_image_prompt(caption: str, width: int | None = None, height: int | None = None) -> str:
    """`Generate an image of {W}x{H} according to the following prompt:\\n{caption}` (width first);
    without a size, the size-free variant used in part of the training data."""
    if width is None and height is None:
        return T2I_TEMPLATE_NO_SIZE.format(caption=caption)
    if width is None or height is None:
        raise ValueError("give both width and height, or neither.")
    return T2I_TEMPLATE.format(width=int(width), height=int(height), caption=caption)


class LuminaMGPTProcessor(ProcessorMixin):
    r"""
    Tokenizer + `LuminaMGPTImageProcessor` + the UniRep layout and conversation template.

    Args:
        image_processor (`LuminaMGPTImageProcessor`), tokenizer (a fast tokenizer over the Chameleon vocabulary).
        Token names (defaults are the published ones): `bos_token` `<s>`, `separator_token` `<reserved08706>`,
        `image_start_token` `<racm3:break>`, `image_end_token` `<eoss>`, `row_end_token` `<reserved08799>`,
        `size_token_base` `<reserved08800>` (a side of n grid units is that id + n), `image_placeholder_token` `<image>`.
    """


    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        bos_token: str = "<s>",
        separator_token: str = "<reserved08706>",
        image_start_token: str = "<racm3:break>",
        image_end_token: str = "<eoss>",
        row_end_token: str = "<reserved08799>",
        size_token_base: str = "<reserved08800>",
        image_placeholder_token: str = "<image>",
        max_size_units: int = 128,
        **kwargs,
    ):
        if image_processor is None:
            image_processor = LuminaMGPTImageProcessor()
        if tokenizer is None:
            raise ValueError("LuminaMGPTProcessor needs a tokenizer over the Chameleon vocabulary.")
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.bos_token, self.separator_token = bos_token, separator_token
        self.image_start_token, self.image_end_token = image_start_token, image_end_token
        self.row_end_token, self.size_token_base = row_end_token, size_token_base
        self.image_placeholder_token = image_placeholder_token
        self.max_size_units = max_size_units
        self._ids = {}
        for attr in (
            "bos_token",
            "separator_token",
            "image_start_token",
            "image_end_token",
            "row_end_token",
            "size_token_base",
            "image_placeholder_token",
        ):
            name = getattr(self, attr)
            tid = tokenizer.convert_tokens_to_ids(name)
            if tid is None or tid == tokenizer.unk_token_id and name != tokenizer.unk_token:
                raise ValueError(f"the tokenizer has no token {name!r} ({attr}); it is not a Chameleon vocabulary.")
            self._ids[attr] = int(tid)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 1

    # ------------------------------------------------------------------ ids
    @property
    def bos_token_id(self) -> int:
        return self._ids["bos_token"]

    @property
    def separator_token_id(self) -> int:
        return self._ids["separator_token"]

    @property
    def image_start_token_id(self) -> int:
        return self._ids["image_start_token"]

    @property
    def image_end_token_id(self) -> int:
        return self._ids["image_end_token"]

    @property
    def row_end_token_id(self) -> int:
        return self._ids["row_end_token"]

    @property
    def size_token_base_id(self) -> int:
        return self._ids["size_token_base"]

    @property
    def image_placeholder_token_id(self) -> int:
        return self._ids["image_placeholder_token"]

    @functools.cached_property
    def image_code_token_ids(self) -> dict[int, int]:
        """token id -> VQ code, read from the tokenizer's vocabulary (never `id - 4`)."""
        out = {}
        for name, tid in self.tokenizer.get_vocab().items():
            code = parse_image_code_token_name(name)
            if code is not None:
                out[int(tid)] = code
        if not out:
            raise ValueError("the tokenizer has no image-code tokens (IMGIMG...Z): it is not a Chameleon vocabulary.")
        return out

    @property
    def unirep(self) -> UniRepLayout:
        """The UniRep layout with this tokenizer's ids and the image processor's grid unit."""
        return UniRepLayout(
            image_start_token_id=self.image_start_token_id,
            image_end_token_id=self.image_end_token_id,
            row_end_token_id=self.row_end_token_id,
            size_token_base_id=self.size_token_base_id,
            max_size_units=self.max_size_units,
            patch_size=self.image_processor.patch_size,
            image_placeholder_token_id=self.image_placeholder_token_id,
        )

    def size_token_id(self, pixels: int) -> int:
        return self.unirep.size_token_id(pixels)

    # ------------------------------------------------------------------ UniRep
    def image_prefix_ids(self, height: int, width: int) -> list[int]:
        """`[<racm3:break>, size(H), size(W)]`: the start of an image of `width x height` pixels."""
        return self.unirep.prefix(height, width)

    def unirep_ids(self, code_token_ids: torch.Tensor) -> list[int]:
        """A `(rows, cols)` grid of image-code token ids -> the full UniRep span."""
        return self.unirep.span(code_token_ids)

    def placeholder_ids(self, height: int, width: int) -> list[int]:
        """The UniRep span of a `width x height` image with `<image>` at every code position."""
        return self.unirep.placeholder_span(height, width)

    def encode_images(self, images, vq_model, random_crop: bool | None = None, seed: int | None = None) -> list[list[int]]:
        """Offline tokenization: preprocess `images`, VQ-encode them with `vq_model` (a
        `LuminaMGPTForConditionalGeneration`) in one batch per bucket, return one UniRep id list per image."""
        feats = self.image_processor(images, random_crop=random_crop, seed=seed)
        return self._encode_pixel_values(feats["pixel_values"], vq_model)

    @staticmethod
    def _pixel_list(pixel_values) -> list[torch.Tensor]:
        return list(pixel_values) if isinstance(pixel_values, (list, tuple)) else list(pixel_values.unbind(0))

    def _encode_pixel_values(self, pixel_values, vq_model) -> list[list[int]]:
        pixels = self._pixel_list(pixel_values)
        out: list[list[int] | None] = [None] * len(pixels)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(pixels):
            by_size.setdefault(tuple(p.shape[-2:]), []).append(i)
        for idx in by_size.values():
            ids = vq_model.encode_images(torch.stack([pixels[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = self.unirep_ids(ids[j].cpu())
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ conversations
    @staticmethod
    def _content_text(content: Any, images: list) -> str:
        """Chat-format content (a string or a list of {"type": "text"|"image"} parts) -> text with markers;
        image parts that carry an image (`image`, `url`, `path`) are appended to `images`."""
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append(part.get("text", ""))
            elif kind == "image":
                parts.append(IMAGE_MARKER)
                for key in ("image", "url", "path"):
                    if part.get(key) is not None:
                        images.append(part[key])
                        break
            else:
                raise ValueError(f"unsupported content part type {kind!r}: use 'text' or 'image'.")
        return "".join(parts)

    def normalize_conversation(self, item: Any, images: Sequence | None = None) -> tuple[list[tuple[str, str]], list]:
        """Any accepted input -> `([(role, text_with_markers), ...], images)`, roles 'user'/'assistant'.

        Accepted: a string (one user turn); chat messages `[{"role", "content"}]`; the original training
        JSON `{"conversations": [{"from": "human"|"gpt", "value"}], "image": [paths]}`."""
        images = list(images) if images is not None else []
        if isinstance(item, str):
            return [("user", item)], images
        if isinstance(item, dict) and "conversations" in item:
            raw = item.get("image", item.get("images")) or []
            images = images + (list(raw) if isinstance(raw, (list, tuple)) else [raw])
            turns = [(t.get("from"), t.get("value")) for t in item["conversations"]]
        elif isinstance(item, dict) and "messages" in item:  # TRL style: {"messages": [...], "images": [...]}
            raw = item.get("images", item.get("image")) or []
            return self.normalize_conversation(item["messages"], images + (list(raw) if isinstance(raw, (list, tuple)) else [raw]))
        elif isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item):
            inline: list = []
            turns = [(m.get("role"), self._content_text(m.get("content"), inline)) for m in item]
            images = inline + images
        else:
            raise ValueError(
                "a conversation must be a string, a list of {'role', 'content'} messages, or "
                f"{{'conversations': [...], 'image': [...]}}; got {type(item).__name__}."
            )
        out = []
        for i, (role, text) in enumerate(turns):
            if role == "system":
                raise ValueError("Lumina-mGPT has no system turn: merge the system text into the first user turn.")
            if role in USER_ROLES:
                role = "user"
            elif role in ASSISTANT_ROLES:
                role = "assistant"
            else:
                raise ValueError(f"turn {i} has role {role!r}; use 'user'/'human' or 'assistant'/'gpt'.")
            if not isinstance(text, str):
                raise ValueError(f"turn {i} has no text (got {type(text).__name__}).")
            out.append((role, text))
        if not out:
            raise ValueError("the conversation has no turns.")
        return out, images

    def _place_images(self, turns: list[tuple[str, str]], n_images: int, where: str) -> list[tuple[str, str]]:
        n_markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
        if n_markers == 0 and n_images:
            first_user = next((i for i, (r, _) in enumerate(turns) if r == "user"), None)
            if first_user is None:
                raise ValueError(f"{where}: images given but there is no user turn to attach them to.")
            turns = list(turns)
            role, text = turns[first_user]
            turns[first_user] = (role, (IMAGE_MARKER + " ") * n_images + text)
        elif n_markers != n_images:
            raise ValueError(
                f"{where}: the text has {n_markers} {IMAGE_MARKER} marker(s) but {n_images} image(s) were given; "
                "give one image per marker (or no markers, to put all images at the start of the first user turn)."
            )
        return turns

    def render_conversation(self, turns: list[tuple[str, str]]) -> str:
        """The conversation as text: `<s>turn_1<sep>turn_2<sep>...` with image markers left in place."""
        return self.bos_token + "".join(text + self.separator_token for _, text in turns)

    def _tokenize_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def tokenize_conversation(
        self, turns: list[tuple[str, str]], image_spans: list[list[int]], where: str = "item 0"
    ) -> tuple[list[int], list[int]]:
        """Turns with markers + one id span per image -> `(input_ids, labels)`; labels are -100 on BOS,
        user turns (their images included) and their separators; assistant turns are trained in full."""
        ids, labels = [self.bos_token_id], [-100]
        next_image = 0
        for role, text in turns:
            pieces = text.split(IMAGE_MARKER)
            turn: list[int] = []
            for k, piece in enumerate(pieces):
                if k > 0:
                    turn.extend(image_spans[next_image])
                    next_image += 1
                turn.extend(self._tokenize_text(piece))
            turn.append(self.separator_token_id)
            ids.extend(turn)
            labels.extend(turn if role == "assistant" else [-100] * len(turn))
        if next_image != len(image_spans):
            raise ValueError(f"{where}: {len(image_spans)} images but {next_image} markers.")
        return ids, labels

    # ------------------------------------------------------------------ main entry points
    def __call__(
        self,
        text: str | list | None = None,
        images: Any = None,
        *,
        conversations: list | None = None,
        vq_model=None,
        return_labels: bool = False,
        padding_side: str | None = None,
        max_length: int | None = None,
        random_crop: bool | None = None,
        seed: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Tokenize one item or a batch.

        - `text`: a string (one user turn: a generation prompt), or a list of strings / conversations.
        - `images`: for one item a list of images; for a batch a list (one list of images per item).
        - `conversations`: alternative to `text` (chat messages or original training JSON items).
        - `vq_model`: encode images here (final ids, no `pixel_values`); else placeholders + `pixel_values`.
        - `return_labels`: training mode (labels, right padding); else left padding for generation.

        Returns `input_ids`, `attention_mask` (`(batch, seq)`), `labels` in training mode, and `pixel_values`
        (list of `(3, H, W)`, in reading order over the batch) when images are left for the model to encode.
        """
        if kwargs:
            raise TypeError(
                f"LuminaMGPTProcessor got unexpected keyword argument(s) {', '.join(repr(k) for k in kwargs)}; it "
                "takes text, images, conversations, vq_model, return_labels, padding_side, max_length, random_crop, "
                "seed and return_tensors."
            )
        items = conversations if conversations is not None else text
        if items is None:
            raise ValueError("give `text` or `conversations`.")
        single = isinstance(items, str) or (isinstance(items, dict)) or (
            isinstance(items, list) and items and all(isinstance(m, dict) and "role" in m for m in items)
        )
        batch = [items] if single else list(items)
        if images is None:
            per_item_images: list = [None] * len(batch)
        elif single:
            per_item_images = [images if isinstance(images, (list, tuple)) else [images]]
        else:
            per_item_images = self._images_per_item(batch, images)

        all_ids, all_labels, all_pixels = [], [], []
        for i, (item, imgs) in enumerate(zip(batch, per_item_images)):
            where = f"item {i}"
            turns, item_images = self.normalize_conversation(item, imgs)
            turns = self._place_images(turns, len(item_images), where)
            if item_images:
                try:
                    feats = self.image_processor(item_images, random_crop=random_crop, seed=seed)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from err
                pixels = self._pixel_list(feats["pixel_values"])
                if vq_model is not None:
                    spans = self._encode_pixel_values(pixels, vq_model)
                else:
                    spans = [self.placeholder_ids(p.shape[-2], p.shape[-1]) for p in pixels]
                    all_pixels.extend(pixels)
            else:
                spans = []
            ids, labels = self.tokenize_conversation(turns, spans, where)
            if return_labels and all(lab == -100 for lab in labels):
                raise ValueError(f"{where} has no trainable token: it needs at least one assistant turn.")
            if max_length is not None and len(ids) > max_length:
                raise ValueError(
                    f"{where} is {len(ids)} tokens, longer than max_length={max_length} (images are never cut)."
                )
            all_ids.append(ids)
            all_labels.append(labels)

        side = padding_side or ("right" if return_labels else "left")
        data: dict[str, Any] = self.pad(all_ids, all_labels if return_labels else None, side)
        if all_pixels:
            data["pixel_values"] = all_pixels
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None.")
        if return_tensors is None:
            data = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
        return BatchFeature(data)

    @staticmethod
    def _images_per_item(batch: list, images) -> list:
        """A batch's images as one list per item: given nested (one list per item), or flat, in which case
        each item takes as many images as its text has markers (or one each, when there are as many images as
        items and the markers do not say otherwise)."""
        images = list(images)
        if any(isinstance(im, (list, tuple)) or im is None for im in images):
            if len(images) != len(batch):
                raise ValueError(f"{len(batch)} items but {len(images)} image lists: give one list per item.")
            return [im if isinstance(im, (list, tuple)) or im is None else [im] for im in images]
        counts = [item.count(IMAGE_MARKER) if isinstance(item, str) else None for item in batch]
        if None not in counts and any(counts):
            if sum(counts) != len(images):
                raise ValueError(
                    f"{len(images)} images for {len(batch)} texts that hold {sum(counts)} {IMAGE_MARKER} marker(s): "
                    "give one image per marker, or one list of images per item."
                )
            out, at = [], 0
            for n in counts:
                out.append(images[at : at + n])
                at += n
            return out
        if len(images) != len(batch):
            raise ValueError(f"{len(images)} images for {len(batch)} items: give one image per item, or one list per item.")
        return [[im] for im in images]

    def pad(self, ids: list[list[int]], labels: list[list[int]] | None = None, side: str = "left") -> dict:
        """Pad id lists to one length with the pad id (labels with -100); `side` 'left' or 'right'."""
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}.")
        n = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        lab = torch.full((len(ids), n), -100, dtype=torch.long) if labels is not None else None
        for i, seq in enumerate(ids):
            sl = slice(n - len(seq), n) if side == "left" else slice(0, len(seq))
            input_ids[i, sl] = torch.tensor(seq, dtype=torch.long)
            mask[i, sl] = 1
            if lab is not None:
                lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": mask}
        if lab is not None:
            out["labels"] = lab
        return out

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        tokenize: bool = True,
        add_generation_prompt: bool = True,
        return_dict: bool = True,
        images: Any = None,
        **kwargs,
    ):
        """Chat messages -> the Lumina-mGPT conversation format (no role words, `<reserved08706>` after each
        turn). `tokenize=False` returns the text (`<s>...` with `<|image|>` markers); otherwise the tokenized
        `BatchFeature` as `__call__` gives it. `add_generation_prompt` has nothing to add: a prompt ends after
        the last user turn's separator. Accepts one conversation or a list of them."""
        batched = isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple))
        convs = list(conversation) if batched else [conversation]
        if not tokenize:
            texts = []
            for i, conv in enumerate(convs):
                extra = None if images is None else (images[i] if batched else images)
                if extra is not None and not isinstance(extra, (list, tuple)):
                    extra = [extra]
                turns, imgs = self.normalize_conversation(conv, extra)
                if imgs:  # markers without images are fine when only the text is asked for
                    turns = self._place_images(turns, len(imgs), f"item {i}")
                texts.append(self.render_conversation(turns))
            return texts if batched else texts[0]
        out = self(conversations=convs, images=images if images is None or batched else [images], **kwargs)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ decoding
    def _split_spans(self, ids: list[int]) -> list[tuple[str, Any]]:
        """ids -> [("text", [ids]) | ("image", grid) | ("error", message)] in order."""
        parts: list[tuple[str, Any]] = []
        text: list[int] = []
        i, n = 0, len(ids)
        start, end, row_end = self.image_start_token_id, self.image_end_token_id, self.row_end_token_id
        while i < n:
            if ids[i] != start:
                text.append(ids[i])
                i += 1
                continue
            if text:
                parts.append(("text", text))
                text = []
            try:
                grid, i = self._parse_image_span(ids, i)
                parts.append(("image", grid))
            except MalformedImageSpanError as err:
                parts.append(("error", str(err)))
                # resume after this span's end token, or at the next image start if that comes first (a span
                # cut short has no end token of its own: the next span's end must not swallow that span)
                after_end = ids.index(end, i) + 1 if end in ids[i:] else n
                next_start = ids.index(start, i + 1) if start in ids[i + 1 :] else n
                i = min(after_end, next_start)
        if text:
            parts.append(("text", text))
        return parts

    def _parse_image_span(self, ids: list[int], i: int) -> tuple[torch.Tensor, int]:
        return self.unirep.parse(ids, i, self.image_code_token_ids)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        """Generated ids -> text, with `<|image|>` where each well-formed image span was (malformed spans are
        dropped: `postprocess_generation` reports them)."""
        ids = torch.as_tensor(token_ids).tolist() if not isinstance(token_ids, list) else list(token_ids)
        ids = [t for t in ids if t != self.pad_token_id] if skip_special_tokens else ids
        pieces = []
        for kind, value in self._split_spans(ids):
            if kind == "text":
                pieces.append(self.tokenizer.decode(value, skip_special_tokens=skip_special_tokens, **kwargs))
            elif kind == "image":
                pieces.append(IMAGE_MARKER)
        return "".join(pieces)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens, **kwargs) for seq in sequences]

    def extract_image_tokens(self, token_ids) -> list[torch.Tensor]:
        """The `(rows, cols)` grids of image-code token ids of every image span, each parsed by its own size
        tokens. Raises `MalformedImageSpanError` on the first malformed span."""
        ids = torch.as_tensor(token_ids).tolist() if not isinstance(token_ids, list) else list(token_ids)
        grids = []
        for kind, value in self._split_spans(ids):
            if kind == "error":
                raise MalformedImageSpanError(value)
            if kind == "image":
                grids.append(value)
        return grids

    def postprocess_generation(self, sequences, model=None, output_type: str = "pil") -> list[DecodedItem]:
        """Decode a batch of generated sequences into text and images.

        Each item gets `DecodedItem(text, images, errors)`. `text` holds one `<|image|>` per returned image, in
        place; a malformed image span is left out of both and reported in that item's `errors` without raising,
        so the other items and the item's other images are kept. With `model`, grids are decoded to images by its VQGAN
        (`output_type` "pil", "np" or "pt"); without, `images` holds the token grids."""
        results = []
        for seq in sequences:
            ids = torch.as_tensor(seq).tolist() if not isinstance(seq, list) else list(seq)
            ids = [t for t in ids if t != self.pad_token_id]
            text, images, errors = [], [], []
            for kind, value in self._split_spans(ids):
                if kind == "text":
                    text.append(self.tokenizer.decode(value, skip_special_tokens=True))
                elif kind == "image":
                    if model is None:
                        images.append(value)
                    else:
                        try:
                            pixels = model.decode_image_tokens(value.unsqueeze(0).to(model.device))
                        except ValueError as err:  # e.g. codes outside this VQGAN's codebook
                            errors.append(str(err))
                            continue
                        images.append(self.image_processor.postprocess(pixels, output_type)[0])
                    text.append(IMAGE_MARKER)  # only where an image is returned
                else:
                    errors.append(value)
            results.append(DecodedItem("".join(text), images, errors))
        return results


__all__ = [
    "LuminaMGPTProcessor",
    "DecodedItem",
    "MalformedImageSpanError",
    "IMAGE_MARKER",
    "OMNI_TASK_PROMPTS",
    "text_to_image_prompt",
]
