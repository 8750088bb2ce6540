"""UniRep in one module: the layout arithmetic checked against a span written out by hand from the published format,
and every user of it (processor, generation, training lengths, the hub card) agreeing with it."""

import pytest
import torch

from lumina_hf.testing_utils import build_tiny_processor, tiny_config
from lumina_hf.unirep import MalformedImageSpanError, UniRepLayout, image_code_table, image_code_token_name


def hand_written_span(height, width, grid):
    """[start, 8804 + H/32, 8804 + W/32, row_0, 8803, ..., row_last, 8803, 8196], written directly."""
    out = [8197, 8804 + height // 32, 8804 + width // 32]
    for row in grid:
        out += list(row) + [8803]
    return out + [8196]


@pytest.mark.parametrize("height,width", [(32, 32), (64, 128), (768, 768), (1024, 256)])
def test_layout_matches_the_published_format(height, width):
    layout = UniRepLayout()
    rows, cols = layout.grid_shape(height, width)
    assert (rows, cols) == (height // 16, width // 16)
    grid = torch.arange(rows * cols).view(rows, cols) + 4
    span = layout.span(grid)
    assert span == hand_written_span(height, width, grid.tolist())
    assert len(span) == layout.span_length(height, width) == rows * (cols + 1) + 4
    assert layout.prefix(height, width) == span[:3]
    kinds = layout.step_kinds(rows, cols)
    assert len(kinds) == len(span) - 3
    assert [k for k, t in zip(kinds, span[3:]) if t == 8803] == ["row_end"] * rows
    assert kinds[-1] == "end" and kinds.count("code") == rows * cols
    parsed, end = layout.parse(span + [1, 2], 0, set(range(4, 8196)))
    assert torch.equal(parsed, grid) and end == len(span)
    placeholder = layout.placeholder_span(height, width)
    assert placeholder == hand_written_span(height, width, [[8711] * cols] * rows)


def test_published_lengths():
    layout = UniRepLayout()
    assert [layout.span_length(s, s) for s in (512, 768, 1024)] == [1060, 2356, 4164]


def test_sizes_are_validated():
    layout = UniRepLayout()
    for bad in (0, 48, 32 * 129, 96.0, "96", True):
        with pytest.raises(ValueError, match="must be"):
            layout.size_token_id(bad)
    assert layout.size_from_token(8804) is None and layout.size_from_token(8805) == 32


def test_parse_reports_malformed_spans():
    layout = UniRepLayout()
    good = hand_written_span(32, 32, [[4, 5], [6, 7]])
    codes = {4, 5, 6, 7}
    for bad in (good[:5], good[:5] + good[6:], good[:-1] + [8710], [8197, 8804, 8805] + good[3:]):
        with pytest.raises(MalformedImageSpanError):
            layout.parse(bad, 0, codes)


def test_code_table_reads_names_not_arithmetic():
    vocab = {image_code_token_name(c): 100 + 3 * c for c in range(5)}
    assert image_code_table(vocab, 5) == [100, 103, 106, 109, 112]
    with pytest.raises(ValueError, match=r"image codes \[5"):
        image_code_table(vocab, 6)


def test_users_agree_with_the_layout():
    from lumina_hf.hub import _tokens_per_image
    from lumina_hf.training.arguments import unirep_length

    config = tiny_config()
    processor = build_tiny_processor(64)
    assert config.unirep == processor.unirep == UniRepLayout()  # the published ids everywhere
    for w, h in processor.image_processor.bucket_sizes:
        n = UniRepLayout().span_length(h, w)
        assert len(processor.placeholder_ids(h, w)) == unirep_length(w, h) == _tokens_per_image(w, h) == n
