"""UniRep: how Lumina-mGPT writes one image as tokens, in one place.

An image of W x H pixels (both multiples of the 32-px grid unit) is the span

    [<racm3:break>, size(H), size(W), row_0 codes, <row end>, ..., row_last codes, <row end>, <eoss>]

with `H/16` rows of `W/16` image-code tokens (the VQGAN's factor 16, raster order). A side of n grid units is the
size token `size_token_base_id + n`; height comes first. Every row, the last included, ends with the row-end token,
so a span is `(H/16) * (W/16 + 1) + 4` tokens long (2356 at 768x768).

Image-code token ids are read from the vocabulary by name (`IMGIMG` + the code's decimal digits written as the
letters A..J + `Z`), never computed as `code + 4`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IMAGE_TOKEN_PREFIX = "IMGIMG"
IMAGE_TOKEN_SUFFIX = "Z"
VQ_FACTOR = 16  # pixels per image code along each side


class MalformedImageSpanError(ValueError):
    """A generated image span does not follow the UniRep layout (wrong size tokens, row lengths, missing
    row-end or end token, non-image ids inside the grid, or a span cut off by the end of the sequence)."""


def image_code_token_name(code: int) -> str:
    """Name of the vocabulary entry for VQ code `code`: decimal digits written as letters A..J.

    >>> image_code_token_name(123)
    'IMGIMGBCDZ'
    """
    if code < 0:
        raise ValueError(f"image codes are non-negative, got {code}")
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + IMAGE_TOKEN_SUFFIX


def parse_image_code_token_name(name: str) -> int | None:
    """Inverse of `image_code_token_name`; None for names that are not image-code tokens."""
    if not (name.startswith(IMAGE_TOKEN_PREFIX) and name.endswith(IMAGE_TOKEN_SUFFIX)):
        return None
    letters = name[len(IMAGE_TOKEN_PREFIX) : -len(IMAGE_TOKEN_SUFFIX)]
    if not letters or any(not ("A" <= c <= "J") for c in letters):
        return None
    return int("".join(str(ord(c) - ord("A")) for c in letters))


def image_code_table(vocabulary: Mapping[str, int], num_codes: int | None = None) -> list[int]:
    """`table[code] = token id` of every image code named in `vocabulary` (token name -> id), codes 0..n-1.

    With `num_codes`, exactly the codes of a codebook of that size are required (a `ValueError` names the missing
    ones); otherwise the table covers codes 0..max found and must have no gap."""
    found: dict[int, int] = {}
    for name, tid in vocabulary.items():
        code = parse_image_code_token_name(name)
        if code is not None and (num_codes is None or code < num_codes):
            found[code] = int(tid)
    n = num_codes if num_codes is not None else (max(found) + 1 if found else 0)
    missing = [c for c in range(n) if c not in found]
    if missing or n == 0:
        raise ValueError(
            f"the vocabulary has no token for image codes {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"(a codebook of {n} entries needs {IMAGE_TOKEN_PREFIX}...{IMAGE_TOKEN_SUFFIX} names for all of them): "
            "the vocabulary and the VQGAN do not match."
        )
    return [found[c] for c in range(n)]


@dataclass(frozen=True)
class UniRepLayout:
    """The token ids and units of the layout; `from_config` reads them from a `LuminaMGPTConfig`."""

    image_start_token_id: int = 8197
    image_end_token_id: int = 8196
    row_end_token_id: int = 8803
    size_token_base_id: int = 8804
    max_size_units: int = 128
    patch_size: int = 32  # pixels per size unit
    image_placeholder_token_id: int = 8711

    @classmethod
    def from_config(cls, config) -> UniRepLayout:
        return cls(
            image_start_token_id=config.image_start_token_id,
            image_end_token_id=config.image_end_token_id,
            row_end_token_id=config.image_row_end_token_id,
            size_token_base_id=config.size_token_base_id,
            max_size_units=config.max_size_units,
            patch_size=config.patch_size,
            image_placeholder_token_id=config.image_placeholder_token_id,
        )

    # ------------------------------------------------------------------ sizes
    def size_units(self, pixels: int, name: str = "image side") -> int:
        """Grid units of one side; `ValueError` unless it is a multiple of `patch_size` within the size tokens."""
        if isinstance(pixels, bool) or not isinstance(pixels, int):
            raise ValueError(f"{name} must be an integer number of pixels, got {pixels!r}.")
        units, rest = divmod(pixels, self.patch_size)
        if rest or not 1 <= units <= self.max_size_units:
            raise ValueError(
                f"{name}={pixels} must be a multiple of {self.patch_size} px between {self.patch_size} and "
                f"{self.patch_size * self.max_size_units}."
            )
        return units

    def size_token_id(self, pixels: int) -> int:
        return self.size_token_base_id + self.size_units(pixels)

    def size_from_token(self, token_id: int) -> int | None:
        """Pixels of a side given by a size token, or None when `token_id` is not a size token."""
        units = int(token_id) - self.size_token_base_id
        return units * self.patch_size if 1 <= units <= self.max_size_units else None

    @staticmethod
    def grid_shape(height: int, width: int) -> tuple[int, int]:
        """`(rows, cols)` of image codes of a `width x height` image."""
        return height // VQ_FACTOR, width // VQ_FACTOR

    # ------------------------------------------------------------------ lengths and schedule
    @staticmethod
    def grid_length(rows: int, cols: int) -> int:
        """Tokens after the size tokens: every row plus its row end, then the image end."""
        return rows * (cols + 1) + 1

    def span_length(self, height: int, width: int) -> int:
        """Tokens of the whole span of a `width x height` image, start and size tokens included."""
        return 3 + self.grid_length(*self.grid_shape(height, width))

    @staticmethod
    def step_kinds(rows: int, cols: int, n_steps: int | None = None) -> list[str]:
        """What each position after the size tokens holds: "code", "row_end" (after every `cols` codes) or "end"
        (after the last row end, and for any padding up to `n_steps`)."""
        grid = rows * (cols + 1)
        n = grid + 1 if n_steps is None else n_steps
        return ["end" if s >= grid else ("row_end" if s % (cols + 1) == cols else "code") for s in range(n)]

    # ------------------------------------------------------------------ spans
    def prefix(self, height: int, width: int) -> list[int]:
        """`[<racm3:break>, size(H), size(W)]`: the start of an image of `width x height` pixels."""
        return [self.image_start_token_id, self.size_token_id(height), self.size_token_id(width)]

    def span(self, code_token_ids) -> list[int]:
        """A `(rows, cols)` grid of image-code token ids -> the full UniRep span."""
        grid = torch.as_tensor(code_token_ids)
        if grid.ndim != 2:
            raise ValueError(f"expected a (rows, cols) grid of image token ids, got shape {tuple(grid.shape)}.")
        rows, cols = grid.shape
        out = self.prefix(rows * VQ_FACTOR, cols * VQ_FACTOR)
        for row in grid.tolist():
            out.extend(row)
            out.append(self.row_end_token_id)
        out.append(self.image_end_token_id)
        return out

    def placeholder_span(self, height: int, width: int) -> list[int]:
        """The span of a `width x height` image with the placeholder id at every code position."""
        rows, cols = self.grid_shape(height, width)
        return self.span(torch.full((rows, cols), self.image_placeholder_token_id, dtype=torch.long))

    def parse(self, ids: Sequence[int], i: int, code_ids: Mapping[int, int] | set[int]) -> tuple[torch.Tensor, int]:
        """Read the span starting at `ids[i]` (an image start token): the `(rows, cols)` grid of code token ids and
        the index after the span. `code_ids` holds the image-code token ids. `MalformedImageSpanError` otherwise."""
        at = f"image span at position {i}"
        if i + 2 >= len(ids):
            raise MalformedImageSpanError(f"{at}: the sequence ends before the size tokens.")
        height, width = self.size_from_token(ids[i + 1]), self.size_from_token(ids[i + 2])
        for name, token, side in (("height", ids[i + 1], height), ("width", ids[i + 2], width)):
            if side is None:
                raise MalformedImageSpanError(
                    f"{at}: {name} token {token} is not a size token "
                    f"({self.size_token_base_id + 1}..{self.size_token_base_id + self.max_size_units})."
                )
        rows, cols = self.grid_shape(height, width)
        need = self.grid_length(rows, cols)
        body = list(ids[i + 3 : i + 3 + need])
        if len(body) < need:
            raise MalformedImageSpanError(
                f"{at}: a {width}x{height} image needs {need} tokens after its size tokens, "
                f"the sequence has {len(body)} (cut off)."
            )
        grid = torch.tensor(body[:-1], dtype=torch.long).view(rows, cols + 1)
        ends = grid[:, -1] == self.row_end_token_id
        if not bool(ends.all()):
            bad = int((~ends).nonzero()[0, 0])
            raise MalformedImageSpanError(f"{at}: row {bad} does not end with the row-end token at column {cols}.")
        if body[-1] != self.image_end_token_id:
            raise MalformedImageSpanError(f"{at}: expected the image end token after row {rows - 1}, got {body[-1]}.")
        codes = grid[:, :-1]
        not_codes = [t for t in codes.flatten().tolist() if t not in code_ids]
        if not_codes:
            raise MalformedImageSpanError(f"{at}: ids {not_codes[:5]} inside the grid are not image-code tokens.")
        return codes, i + 3 + need


__all__ = [
    "IMAGE_TOKEN_PREFIX",
    "IMAGE_TOKEN_SUFFIX",
    "MalformedImageSpanError",
    "UniRepLayout",
    "VQ_FACTOR",
    "image_code_table",
    "image_code_token_name",
    "parse_image_code_token_name",
]
