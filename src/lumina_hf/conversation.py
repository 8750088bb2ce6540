"""The Lumina-mGPT conversation format, as data: the prompts it was trained on, the chat template, and how chat
messages, the original training JSON and images become turns.

A conversation is BOS then each turn's text followed by the separator `<reserved08706>`, with no role words.
`<|image|>` in a turn marks where the next image goes; images given without markers go at the start of the first
user turn, each as `<|image|> ` (marker and a space). The template marks the assistant turns with
`{% generation %}`: they are what training labels.
"""

import functools
from collections.abc import Sequence
from typing import Any

IMAGE_MARKER = "<|image|>"
T2I_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{caption}"
T2I_TEMPLATE_NO_SIZE = "Generate an image according to the following prompt:\n{caption}"

# Omni-SFT instructions, written as the published models were trained (including "Segmentic").
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

# The conversation format. No role words: every turn is its text and the separator; assistant turns (text, images and
# separator) are inside `{% generation %}`, which is what training labels. Content is a string or a list of
# {"type": "text"|"image"} parts (an image part becomes the marker). @BOS@, @SEP@ and @IMAGE@ are filled in with the
# processor's token strings when the template is built.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ raise_exception('Lumina-mGPT has no system turn: merge the system text into the first user turn.') }}"
    "{%- endif -%}"
    "@BOS@"
    "{%- for message in messages -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- elif message['content'] is not none -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set ns.text = ns.text ~ part['text'] -%}"
    "{%- elif part['type'] == 'image' -%}{%- set ns.text = ns.text ~ '@IMAGE@' -%}"
    "{%- else -%}{{ raise_exception('unsupported content part type ' ~ part['type'] ~ \": use 'text' or 'image'.\") }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] in ['assistant', 'gpt'] -%}{%- generation -%}{{ ns.text }}@SEP@{%- endgeneration -%}"
    "{%- elif message['role'] in ['user', 'human'] -%}{{ ns.text }}@SEP@"
    "{%- else -%}{{ raise_exception('turn role ' ~ message['role'] ~ \" is not 'user'/'human' or 'assistant'/'gpt'.\") }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def build_chat_template(bos_token: str = "<s>", separator_token: str = "<reserved08706>") -> str:
    """The conversation format's Jinja template for the given BOS and separator token strings."""
    return CHAT_TEMPLATE.replace("@BOS@", bos_token).replace("@SEP@", separator_token).replace("@IMAGE@", IMAGE_MARKER)


@functools.lru_cache(maxsize=8)
def render_function(chat_template: str):
    """`f(conversations=[messages]) -> (texts, generation spans)`: the template rendered by transformers' own
    renderer, with the character spans of its `{% generation %}` blocks. It is what
    `ProcessorMixin.apply_chat_template(return_assistant_tokens_mask=True)` uses, but that method only returns the
    spans mapped onto one tokenization of the whole string, and the processor tokenizes the rendered text piece by
    piece (see `LuminaMGPTProcessor._ids_and_labels`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    return functools.partial(render_jinja_template, chat_template=chat_template, return_assistant_tokens_mask=True)


def text_to_image_prompt(caption: str, width: int | None = None, height: int | None = None) -> str:
    """`Generate an image of {W}x{H} according to the following prompt:\\n{caption}` (width first);
    without a size, the size-free variant used in part of the training data."""
    if width is None and height is None:
        return T2I_TEMPLATE_NO_SIZE.format(caption=caption)
    if width is None or height is None:
        raise ValueError("give both width and height, or neither.")
    return T2I_TEMPLATE.format(width=int(width), height=int(height), caption=caption)


def content_text(content: Any, images: list) -> str:
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

def normalize_conversation(item: Any, images: Sequence | None = None) -> tuple[list[tuple[str, str]], list]:
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
        return normalize_conversation(item["messages"], images + (list(raw) if isinstance(raw, (list, tuple)) else [raw]))
    elif isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item):
        inline: list = []
        turns = [(m.get("role"), content_text(m.get("content"), inline)) for m in item]
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

def place_images(turns: list[tuple[str, str]], n_images: int, where: str) -> list[tuple[str, str]]:
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


def images_per_item(batch: list, images) -> list:
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


__all__ = [
    "ASSISTANT_ROLES",
    "CHAT_TEMPLATE",
    "IMAGE_MARKER",
    "OMNI_TASK_PROMPTS",
    "USER_ROLES",
    "build_chat_template",
    "content_text",
    "images_per_item",
    "normalize_conversation",
    "place_images",
    "render_function",
    "text_to_image_prompt",
]
