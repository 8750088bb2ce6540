"""LuminaMGPTProcessor: the Lumina-mGPT data format on transformers' processor machinery.

A conversation is `<s>` then each turn's text followed by `<reserved08706>`, with no role words: the processor's
chat template (`default_chat_template`, Jinja) writes it and marks the assistant turns with `{% generation %}`, and
exactly those turns are trained (labels are the ids there, -100 elsewhere). `<|image|>` in a turn marks where the
next image goes; the `replace_image_token` hook turns each image into its UniRep span with `<image>` placeholders at
the code positions, `[<racm3:break>, size(H), size(W), <image> x W/16, <row end>, ..., <row end>, <eoss>]`, and the
image's `pixel_values` are returned beside the ids: the model fills in the VQ codes (`fill_image_placeholders`, or
`forward`/`generate` with `pixel_values`). Offline tokenization for training VQ-encodes in batches in
`lumina_hf.training`.
"""

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs

from .conversation import (
    IMAGE_MARKER,
    OMNI_TASK_PROMPTS,
    build_chat_template,
    images_per_item,
    normalize_conversation,
    place_images,
    render_function,
    text_to_image_prompt,
)
from .image_processing_lumina_mgpt import LuminaMGPTImageProcessor
from .padding import IGNORE_INDEX, pad_batch
from .unirep import MalformedImageSpanError, UniRepLayout, parse_image_code_token_name

logger = logging.getLogger(__name__)

class LuminaMGPTImagesKwargs(ImagesKwargs, total=False):
    """random_crop (`bool`): crop at a seeded random offset instead of the centre (training augmentation).
    seed (`int`): seed of the random crops of one call."""

    random_crop: bool | None
    seed: int | None


class LuminaMGPTProcessorKwargs(ProcessingKwargs, total=False):
    """return_labels (`bool`, defaults to False): training mode: `labels` (-100 outside the assistant turns) and right
    padding; otherwise left padding for generation. Text keywords: `padding_side` ("left"/"right"), `max_length` (an
    error for longer items: images are never cut) and `return_tensors` ("pt" or None); image keywords: `random_crop`,
    `seed`."""

    images_kwargs: LuminaMGPTImagesKwargs
    return_labels: bool


# What this processor implements of the keywords above; anything else is refused by name (transformers' own merge
# only logs unknown keywords, and silently ignoring e.g. a misspelt `max_length` gives untruncated, unchecked items).
SUPPORTED_KWARGS = {
    "text_kwargs": ("padding_side", "max_length", "return_tensors"),
    "images_kwargs": ("random_crop", "seed"),
    "": ("return_labels",),
}


@dataclasses.dataclass
class DecodedItem:
    """One generated sequence, decoded: `text` with one `<|image|>` per returned image, where it was, `images`
    (PIL, numpy or tensors, or token grids when no model is given), and `errors`: one message per malformed
    span (that span is left out of `text` and `images`; the other spans and items are unaffected)."""

    text: str
    images: list[Any]
    errors: list[str]


class LuminaMGPTProcessor(ProcessorMixin):
    r"""
    Tokenizer + `LuminaMGPTImageProcessor` + the UniRep layout and the conversation template.

    Args:
        image_processor (`LuminaMGPTImageProcessor`), tokenizer (a fast tokenizer over the Chameleon vocabulary).
        chat_template (`str`, *optional*): a Jinja template for the conversation format; by default the built-in
            one (`default_chat_template`, not written to saved folders). Turns inside `{% generation %}` are trained.
        Token names (defaults are the published ones): `bos_token` `<s>`, `separator_token` `<reserved08706>`,
        `image_start_token` `<racm3:break>`, `image_end_token` `<eoss>`, `row_end_token` `<reserved08799>`,
        `size_token_base` `<reserved08800>` (a side of n grid units is that id + n), `image_placeholder_token` `<image>`.
    """

    valid_processor_kwargs = LuminaMGPTProcessorKwargs
    text_kwargs = {"return_tensors": "pt"}
    return_labels = False

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
        self.image_token = IMAGE_MARKER  # the marker in the text that `replace_image_token` expands
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
        self.image_token_id = self._ids["image_placeholder_token"]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 1
        self._span_text: dict[tuple[int, int], str] = {}
        self._check_layout_tokens()

    def _check_layout_tokens(self) -> None:
        """The template and the placeholder spans are text; each of their tokens must read back as its own id."""
        layout = self.unirep
        ids = [self.bos_token_id, self.separator_token_id, *layout.placeholder_span(32, 32)]
        ids += [self.size_token_base_id + n for n in range(1, self.max_size_units + 1)]
        text = "".join(self.tokenizer.convert_ids_to_tokens(ids))
        if self._tokenize_text(text) != ids:
            raise ValueError(
                "the tokenizer does not read the conversation and image layout tokens (<s>, the separator, image "
                "start/end, row end, size and placeholder tokens) back as single tokens: they must be added tokens "
                "of a Chameleon vocabulary."
            )

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

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text that replaces the `image_idx`-th `<|image|>` marker: the image's UniRep span (at the size of its
        bucket, `image_inputs["image_sizes"]`) with `<image>` placeholders at the code positions."""
        height, width = (int(v) for v in image_inputs["image_sizes"][image_idx])
        text = self._span_text.get((height, width))
        if text is None:
            text = "".join(self.tokenizer.convert_ids_to_tokens(self.placeholder_ids(height, width)))
            self._span_text[(height, width)] = text
        return text

    @staticmethod
    def _pixel_list(pixel_values) -> list[torch.Tensor]:
        return list(pixel_values) if isinstance(pixel_values, (list, tuple)) else list(pixel_values.unbind(0))

    # ------------------------------------------------------------------ conversations
    def normalize_conversation(self, item: Any, images: Sequence | None = None) -> tuple[list[tuple[str, str]], list]:
        """Any accepted input -> `([(role, text_with_markers), ...], images)`, roles 'user'/'assistant'
        (see `lumina_hf.conversation.normalize_conversation`)."""
        return normalize_conversation(item, images)

    def _place_images(self, turns: list[tuple[str, str]], n_images: int, where: str) -> list[tuple[str, str]]:
        return place_images(turns, n_images, where)

    @property
    def default_chat_template(self) -> str:
        """The built-in conversation template, with this processor's BOS and separator tokens."""
        return build_chat_template(self.bos_token, self.separator_token)

    def _template(self, chat_template: str | None = None) -> str:
        return chat_template or self.chat_template or self.default_chat_template

    def _render(self, turns: list[tuple[str, str]], chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation (markers left in place) and the character spans of its trained turns."""
        messages = [{"role": role, "content": text} for role, text in turns]
        rendered, spans = render_function(self._template(chat_template))(conversations=[messages])
        return rendered[0], [tuple(s) for s in spans[0]]

    def render_conversation(self, turns: list[tuple[str, str]], chat_template: str | None = None) -> str:
        """The conversation as text: `<s>turn_1<sep>turn_2<sep>...` with image markers left in place."""
        return self._render(turns, chat_template)[0]

    def _tokenize_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _ids_and_labels(
        self, turns: list[tuple[str, str]], image_spans: Sequence[str | Sequence[int]], where: str, chat_template=None
    ) -> tuple[list[int], list[int]]:
        """Render `turns`, put each image span (placeholder text from `replace_image_token`, or a list of ids) at its
        marker, and tokenize. The rendered text is cut where the template's `{% generation %}` blocks start and end,
        and the pieces are tokenized one by one; the ids of the pieces inside a block are the labels, -100 elsewhere.
        Every cut sits next to a separator or BOS token, which the tokenizer never merges with its neighbours, so the
        ids are those of the whole text, while the labels follow the blocks exactly (an offset mapping of one
        tokenization of the whole text would lose zero-width and trimmed tokens at the block edges)."""
        text, spans = self._render(turns, chat_template)
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        ids: list[int] = []
        labels: list[int] = []
        next_image = 0
        for a, b in zip(cuts, cuts[1:]):
            trained = any(s <= a and b <= e for s, e in spans)
            piece_ids: list[int] = []
            pending = ""
            for k, piece in enumerate(text[a:b].split(IMAGE_MARKER)):
                if k:
                    if next_image >= len(image_spans):
                        raise ValueError(f"{where}: {len(image_spans)} images but more {IMAGE_MARKER} markers.")
                    span = image_spans[next_image]
                    next_image += 1
                    if isinstance(span, str):
                        pending += span
                    else:
                        piece_ids += self._tokenize_text(pending) + [int(t) for t in span]
                        pending = ""
                pending += piece
            piece_ids += self._tokenize_text(pending)
            ids += piece_ids
            labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        if next_image != len(image_spans):
            raise ValueError(f"{where}: {len(image_spans)} images but {next_image} markers.")
        return ids, labels

    def tokenize_conversation(
        self, turns: list[tuple[str, str]], image_spans: list[list[int]], where: str = "item 0"
    ) -> tuple[list[int], list[int]]:
        """Turns with markers + one id span per image (e.g. VQ-encoded UniRep spans) -> `(input_ids, labels)`;
        labels are -100 on BOS, user turns (their images included) and their separators; assistant turns are trained
        in full."""
        return self._ids_and_labels(turns, [list(s) for s in image_spans], where)

    # ------------------------------------------------------------------ main entry points
    def _check_kwargs(self, kwargs: dict) -> None:
        known = {*SUPPORTED_KWARGS[""], *SUPPORTED_KWARGS["text_kwargs"], *SUPPORTED_KWARGS["images_kwargs"]}
        bad = [k for k in kwargs if k not in known and k not in ("text_kwargs", "images_kwargs")]
        for group in ("text_kwargs", "images_kwargs"):
            bad += [f"{group}[{k!r}]" for k in kwargs.get(group) or {} if k not in SUPPORTED_KWARGS[group]]
        if bad:
            raise TypeError(
                f"LuminaMGPTProcessor got unexpected keyword argument(s) {', '.join(repr(k) if '[' not in k else k for k in bad)}; "
                "it takes text, images, conversations, return_labels, padding_side, max_length, random_crop, seed and "
                "return_tensors (the VQ codes of images come from the model: pass pixel_values to it, or "
                "fill_image_placeholders)."
            )

    def __call__(self, text: str | list | None = None, images: Any = None, *, conversations: list | None = None, **kwargs) -> BatchFeature:
        """Tokenize one item or a batch.

        - `text`: a string (one user turn: a generation prompt), or a list of strings / conversations.
        - `images`: for one item a list of images; for a batch a list (one list of images per item), or a flat list
          shared out by the items' markers.
        - `conversations`: alternative to `text` (chat messages or original training JSON items).
        - keywords (`LuminaMGPTProcessorKwargs`): `return_labels` (training mode: labels, right padding; else left
          padding for generation), `padding_side`, `max_length`, `return_tensors`, `random_crop`, `seed`.

        Returns `input_ids`, `attention_mask` (`(batch, seq)`), `labels` in training mode, and `pixel_values` (list
        of `(3, H, W)`, in reading order over the batch) for the model to encode into the placeholder positions.
        """
        return self._process(text, images, conversations, kwargs)

    def _process(self, text, images, conversations, kwargs, chat_template: str | None = None) -> BatchFeature:
        self._check_kwargs(kwargs)
        from huggingface_hub.errors import StrictDataclassError

        try:
            merged = self._merge_kwargs(LuminaMGPTProcessorKwargs, **kwargs)
        except StrictDataclassError as err:  # the typed-dict check of a keyword's value
            raise TypeError(f"LuminaMGPTProcessor: {err}") from err
        text_kwargs, image_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_labels = bool(merged.get("return_labels", False))
        max_length = text_kwargs.get("max_length")
        return_tensors = text_kwargs.get("return_tensors", "pt")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None.")
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
            per_item_images = images_per_item(batch, images)

        all_ids, all_labels, all_pixels = [], [], []
        for i, (item, imgs) in enumerate(zip(batch, per_item_images)):
            where = f"item {i}"
            turns, item_images = self.normalize_conversation(item, imgs)
            turns = self._place_images(turns, len(item_images), where)
            spans: list[str] = []
            if item_images:
                try:
                    feats = self.image_processor(item_images, **image_kwargs)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from err
                spans = [self.replace_image_token(feats, k) for k in range(len(item_images))]
                all_pixels.extend(self._pixel_list(feats["pixel_values"]))
            ids, labels = self._ids_and_labels(turns, spans, where, chat_template)
            if return_labels and all(lab == IGNORE_INDEX for lab in labels):
                raise ValueError(f"{where} has no trainable token: it needs at least one assistant turn.")
            if max_length is not None and len(ids) > max_length:
                raise ValueError(
                    f"{where} is {len(ids)} tokens, longer than max_length={max_length} (images are never cut)."
                )
            all_ids.append(ids)
            all_labels.append(labels)

        side = text_kwargs.get("padding_side") or ("right" if return_labels else "left")
        data: dict[str, Any] = self.pad(all_ids, all_labels if return_labels else None, side)
        if all_pixels:
            data["pixel_values"] = all_pixels
        if return_tensors is None:
            data = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
        return BatchFeature(data)

    def pad(self, ids: list[list[int]], labels: list[list[int]] | None = None, side: str = "left") -> dict:
        """Pad id lists to one length with the pad id (labels with -100); `side` 'left' or 'right'."""
        return pad_batch(ids, self.pad_token_id, side=side, labels=labels)

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
        the last user turn's separator. Accepts one conversation or a list of them; `chat_template` replaces the
        processor's template for this call."""
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
                texts.append(self.render_conversation(turns, chat_template))
            return texts if batched else texts[0]
        out = self._process(None, images if images is None or batched else [images], convs, kwargs, chat_template)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ decoding
    def _split_spans(self, ids: list[int]) -> list[tuple[str, Any]]:
        """ids -> [("text", [ids]) | ("image", grid) | ("error", message)] in order."""
        parts: list[tuple[str, Any]] = []
        text: list[int] = []
        i, n = 0, len(ids)
        start, end = self.image_start_token_id, self.image_end_token_id
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
    "LuminaMGPTProcessorKwargs",
    "DecodedItem",
    "MalformedImageSpanError",
    "IMAGE_MARKER",
    "OMNI_TASK_PROMPTS",
    "build_chat_template",
    "text_to_image_prompt",
]
