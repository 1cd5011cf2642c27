"""Qwen2.5-VL pure helpers: M-RoPE layout, offset columns, received attention, window order."""

from __future__ import annotations

import pytest
import torch

from vllm_promprune.families.qwen_vision import (
    Media,
    chunked_column_sums,
    decode_offsets,
    encode_offsets,
    frame_bounds,
    fused_column_sums,
    grid_offsets,
    merged_tower_outputs,
    mrope_positions,
    received_attention,
    to_merged_raster,
)


def test_unpruned_layout_is_text_then_grid_then_text() -> None:
    # 3 text tokens, a 1 x 2 x 3 image, 2 text tokens.
    positions, delta = mrope_positions(11, [Media(offset=3, length=6, grid=(1, 2, 3))])
    assert positions.tolist() == [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],
    ]
    assert delta == 8 - 11  # next generated token at position 8


@pytest.mark.parametrize(("grid", "after"), [((1, 4, 4), 4), ((1, 24, 8), 24), ((1, 8, 24), 24)])
def test_pruned_image_slots_start_at_image_start_and_text_advances_as_unpruned(grid: tuple, after: int) -> None:
    keep = 5
    positions, delta = mrope_positions(2 + keep + 3, [Media(offset=2, length=keep, grid=grid)])
    assert positions[:, 2 : 2 + keep].tolist() == [[2] * keep] * 3
    assert positions[:, 2 + keep].tolist() == [2 + after] * 3
    unpruned, unpruned_delta = mrope_positions(2 + grid[1] * grid[2] + 3, [Media(2, grid[1] * grid[2], grid)])
    assert positions[:, -3:].tolist() == unpruned[:, -3:].tolist()
    assert positions.shape[1] + delta == unpruned.shape[1] + unpruned_delta  # same next position


def test_video_time_axis_uses_the_temporal_step() -> None:
    positions, _ = mrope_positions(8, [Media(offset=0, length=8, grid=(2, 2, 2), t_factor=4.0)])
    assert positions[0].tolist() == [0, 0, 0, 0, 4, 4, 4, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_offset_columns_are_exact_in_low_precision(dtype: torch.dtype) -> None:
    offsets = torch.tensor([[0, 0, 0], [0, 255, 256], [3, 1000, 4095], [0, 65535, 12345]])
    assert torch.equal(decode_offsets(encode_offsets(offsets, dtype)), offsets)


def test_grid_offsets_are_raster_row_and_column() -> None:
    assert grid_offsets(torch.tensor([0, 5, 23, 24]), grid_width=8).tolist() == [[0, 0, 0], [0, 0, 5], [0, 2, 7], [0, 3, 0]]


def _direct_received(query: torch.Tensor, key: torch.Tensor, bounds: list[int], scale: float) -> torch.Tensor:
    """The definition in float64: every query's full softmax over its sequence's keys,
    averaged over queries and heads."""
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        q, k = query[start:stop].double(), key[start:stop].double()
        parts.append((torch.einsum("qhd,khd->hqk", q, k) * scale).softmax(-1).mean(dim=(0, 1)))
    return torch.cat(parts)


def _softmax_chunks_received(
    query: torch.Tensor, key: torch.Tensor, bounds: list[int], scale: float, chunk_elements: int = 2**26
) -> torch.Tensor:
    """The implementation this project used before the fused one (the oracle for "within
    float rounding of before"): float32 softmax over chunks of whole query rows."""
    received = torch.empty(query.shape[0], dtype=torch.float32)
    heads = query.shape[1]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        q, k = query[start:stop].float(), key[start:stop].float()
        length = stop - start
        rows = max(1, chunk_elements // (length * heads))
        total = torch.zeros(length, dtype=torch.float32)
        for row in range(0, length, rows):
            logits = torch.einsum("qhd,khd->hqk", q[row : row + rows], k) * scale
            total += logits.softmax(dim=-1).sum(dim=(0, 1))
        received[start:stop] = total / (heads * length)
    return received


# Packed sequences of unequal lengths, one of a single patch; 1 to 5 heads; head widths
# below, at and above the fused kernel's tile-free sizes; a large scale makes peaked rows.
RECEIVED_CASES = [
    ([0, 12, 30], 3, 8, 0.35),
    ([0, 1, 97, 353], 5, 16, 16**-0.5),
    ([0, 64], 1, 80, 3.0),
    ([0, 200, 201, 700], 4, 24, 24**-0.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bounds", "heads", "width", "scale"), RECEIVED_CASES)
def test_received_attention_equals_the_softmax_definition(
    bounds: list[int], heads: int, width: int, scale: float, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(heads * width)
    query, key = (2 * torch.randn(2, bounds[-1], heads, width, generator=generator)).to(dtype)
    got = received_attention(query, key, bounds, scale)
    assert got.dtype == torch.float32
    exact = _direct_received(query, key, bounds, scale)
    before = _softmax_chunks_received(query, key, bounds, scale)

    def relative_error(values: torch.Tensor) -> float:
        return float(((values.double() - exact).abs() / (exact + 1e-12)).max())

    # Float32 rounding grows with the logits (|s| up to ~380 in the peaked case, where both
    # implementations err by ~1e-4): as accurate as the previous implementation, within 2x.
    assert relative_error(got) <= 2 * relative_error(before) + 1e-6, (relative_error(got), relative_error(before))
    for start, stop in zip(bounds[:-1], bounds[1:]):  # each sequence's scores are a distribution
        assert torch.isclose(got[start:stop].sum().double(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize(("bounds", "heads", "width", "scale"), RECEIVED_CASES)
def test_chunked_column_sums_equal_the_fused_ones(bounds: list[int], heads: int, width: int, scale: float) -> None:
    # The path off CPU, run here on CPU with one row, three rows and every row per chunk;
    # the sequence is all of `bounds` (column sums need not come from packed sequences).
    generator = torch.Generator().manual_seed(7)
    query, key = 2 * torch.randn(2, heads, bounds[-1], width, generator=generator)
    logits = torch.einsum("hqd,hkd->hqk", query.double(), key.double()) * scale
    exact = logits.softmax(-1).sum(dim=(0, 1))
    # Each probability is exp of a float32 logit difference: relative error ~ eps * |logit|.
    rtol = 4 * torch.finfo(torch.float32).eps * float(logits.abs().max())
    assert torch.allclose(fused_column_sums(query, key, scale).double(), exact, rtol=rtol, atol=1e-9)
    for chunk_elements in (1, 3 * heads * bounds[-1], 2**26):
        chunked = chunked_column_sums(query, key, scale, chunk_elements)
        assert torch.allclose(chunked.double(), exact, rtol=rtol, atol=1e-9), chunk_elements


def test_to_merged_raster_undoes_the_window_permutation() -> None:
    window_index = torch.tensor([2, 0, 3, 1])  # merge-group order the tower runs in
    raster_patches = torch.arange(16).view(4, 4)  # 4 groups of 4 patches
    window_ordered = raster_patches[window_index].flatten()
    groups = to_merged_raster(window_ordered, torch.argsort(window_index), unit=4)
    assert torch.equal(groups, raster_patches)


def test_merged_outputs_skip_saliency_per_image_and_keep_the_given_features() -> None:
    # Three images of 3, 2 and 4 merge groups (unit 4); the window order permutes each
    # image's groups among themselves, as Qwen2.5-VL's does.
    sizes, unit = [3, 2, 4], 4
    window_index = torch.tensor([2, 0, 1, 4, 3, 8, 6, 5, 7])
    reverse = torch.argsort(window_index)
    generator = torch.Generator().manual_seed(0)
    received = torch.rand(sum(sizes) * unit, generator=generator)
    merger_input = torch.randn(sum(sizes) * unit, 5, generator=generator)
    merged = torch.randn(sum(sizes), 7, generator=generator)
    per_image = list(received.split([size * unit for size in sizes]))
    every = merged_tower_outputs(per_image, merger_input, reverse, unit, sizes)
    some = merged_tower_outputs([None, per_image[1], per_image[2]], merger_input, reverse, unit, sizes, merged)

    raster_scores = to_merged_raster(received, reverse, unit).mean(dim=1).split(sizes)
    for image, (full, partial) in enumerate(zip(every, some)):
        assert torch.equal(full.saliency[0], raster_scores[image])
        assert torch.equal(full.hidden, partial.hidden) and full.keys is None and partial.keys is None
        assert full.features is None
        assert torch.equal(partial.features[0], merged.split(sizes)[image])
        assert partial.saliency is None if image == 0 else torch.equal(partial.saliency, full.saliency)


def test_frame_bounds_are_one_full_attention_sequence_per_frame() -> None:
    grids = [(1, 4, 6), (2, 2, 2), (1, 14, 10)]
    # transformers' Qwen2.5-VL tower: cu_seqlens = [0, cumsum(repeat_interleave(h * w, t))]
    grid = torch.tensor(grids)
    expected = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).cumsum(0)
    assert frame_bounds(grids) == [0, *expected.tolist()] == [0, 24, 28, 32, 172]
