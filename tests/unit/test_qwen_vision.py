"""Qwen2.5-VL pure helpers: M-RoPE layout, offset columns, received attention, window order."""

from __future__ import annotations

import pytest
import torch

from vllm_promprune.families.qwen_vision import (
    Media,
    decode_offsets,
    encode_offsets,
    frame_bounds,
    grid_offsets,
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


def test_received_attention_equals_full_softmax_average() -> None:
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 30, 3, 8, generator=generator)
    bounds = [0, 12, 30]
    got = received_attention(query, key, bounds, 0.35, chunk_elements=50)  # forces several query chunks
    for start, stop in zip(bounds[:-1], bounds[1:]):
        probs = (torch.einsum("qhd,khd->hqk", query[start:stop], key[start:stop]) * 0.35).softmax(-1)
        assert torch.allclose(got[start:stop], probs.mean(dim=(0, 1)), atol=1e-7)
        assert torch.isclose(got[start:stop].sum(), torch.tensor(1.0))


def test_to_merged_raster_undoes_the_window_permutation() -> None:
    window_index = torch.tensor([2, 0, 3, 1])  # merge-group order the tower runs in
    raster_patches = torch.arange(16).view(4, 4)  # 4 groups of 4 patches
    window_ordered = raster_patches[window_index].flatten()
    groups = to_merged_raster(window_ordered, torch.argsort(window_index), unit=4)
    assert torch.equal(groups, raster_patches)


def test_frame_bounds_are_one_full_attention_sequence_per_frame() -> None:
    grids = [(1, 4, 6), (2, 2, 2), (1, 14, 10)]
    # transformers' Qwen2.5-VL tower: cu_seqlens = [0, cumsum(repeat_interleave(h * w, t))]
    grid = torch.tensor(grids)
    expected = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).cumsum(0)
    assert frame_bounds(grids) == [0, *expected.tolist()] == [0, 24, 28, 32, 172]
