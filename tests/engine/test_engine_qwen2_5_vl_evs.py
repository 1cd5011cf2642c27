"""vLLM's own video pruning (EVS, `--video-pruning-rate`, Qwen2.5-VL only) next to the
plugin's image pruning: EVS videos and pruned images both get exact M-RoPE positions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .test_engine_qwen import (
    FAMILIES,
    GRID_SETTINGS,
    PROMPT,
    VIDEO_GRID,
    VIDEO_PROMPT,
    VIDEO_T_STEP,
    _recording_engine,
    _solo_with_positions,
    _video,
)

CASES = FAMILIES["qwen2.5-vl"].images.cases


@pytest.fixture(scope="module")
def stock_llm(tiny_qwen2_5_vl: Path) -> Iterator[object]:
    with _recording_engine(tiny_qwen2_5_vl, pruned=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def evs_llm(tiny_qwen2_5_vl: Path) -> Iterator[object]:
    with _recording_engine(tiny_qwen2_5_vl, pruned=True, video_pruning_rate=0.25) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(tiny_qwen2_5_vl: Path):  # noqa: ANN201
    from vllm_promprune.reference import load_reference

    return load_reference(tiny_qwen2_5_vl)


def test_vllm_video_pruning_gets_exact_positions(evs_llm, reference) -> None:
    t, h, w = VIDEO_GRID
    request = {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": _video(seed=30)}}
    ids, tokens, positions = _solo_with_positions(evs_llm, request)
    video = (torch.tensor(ids) == reference.config.video_token_id).nonzero().squeeze(1)
    assert len(video) == t * h * w * 3 // 4  # EVS at rate 0.25
    start = int(positions[0, video[0]])
    cells = positions[:, video] - start
    first_frame = cells[:, : h * w]  # EVS always keeps every token of the first frame
    assert torch.equal(first_frame[0], torch.zeros(h * w, dtype=first_frame.dtype))
    assert torch.equal(first_frame[1:], torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1))
    later = cells[:, h * w :]
    assert bool((later[0] == VIDEO_T_STEP).all()) and int(later[1:].max()) < max(h, w)
    assert len({tuple(cell) for cell in later.T.tolist()}) == later.shape[1]  # distinct grid cells
    after = int(video.max()) + 1
    assert positions[:, after].tolist() == [start + max((t - 1) * VIDEO_T_STEP, h - 1, w - 1) + 1] * 3  # as unpruned
    assert len(tokens) == 8


def test_vllm_video_pruning_of_one_temporal_patch_is_positioned_as_stock(evs_llm, stock_llm) -> None:
    # 2 frames = one temporal patch: EVS keeps every token (it always keeps the first
    # frame), so the video is unpruned and its slots carry stock grid positions already;
    # adding EVS's grid offsets on top would double them.
    request = {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": _video(num_frames=2, seed=40)}}
    ids, tokens, positions = _solo_with_positions(evs_llm, request)
    stock_ids, stock_tokens, stock_positions = _solo_with_positions(stock_llm, request)
    assert ids == stock_ids
    assert torch.equal(positions, stock_positions)
    assert tokens == stock_tokens


def test_vllm_video_pruning_with_fractional_seconds_per_grid(evs_llm, stock_llm, reference) -> None:
    # fps 3: second_per_grid_ts = 2/3, time step 2/3 x 4 tokens/s = 8/3, so the second temporal
    # patch sits at t = floor(8/3) = 2 in the unpruned model (vLLM's own EVS column casts
    # 2/3 to 0 first and would put it at t = 0).
    t, h, w = VIDEO_GRID
    request = {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": _video(seed=50, fps=3.0)}}
    ids, _, positions = _solo_with_positions(evs_llm, request)
    stock_ids, _, stock_positions = _solo_with_positions(stock_llm, request)
    video = (torch.tensor(ids) == reference.config.video_token_id).nonzero().squeeze(1)
    stock_video = (torch.tensor(stock_ids) == reference.config.video_token_id).nonzero().squeeze(1)
    assert len(video) == t * h * w * 3 // 4 and len(stock_video) == t * h * w
    kept = positions[:, video]
    assert torch.equal(kept[:, : h * w], stock_positions[:, stock_video[: h * w]])  # first frame: all of it
    later = kept[:, h * w :] - kept[0, 0]
    assert bool((later[0] == 2).all())
    assert {tuple(c) for c in kept.T.tolist()} <= {tuple(c) for c in stock_positions[:, stock_video].T.tolist()}
    after, stock_after = int(video.max()) + 1, int(stock_video.max()) + 1
    assert torch.equal(positions[:, after:], stock_positions[:, stock_after:])  # text after: as unpruned


def test_image_pruning_next_to_vllm_video_pruning(evs_llm, reference) -> None:
    settings = GRID_SETTINGS
    ids, tokens, positions = _solo_with_positions(evs_llm, CASES.request([CASES.textured("tall")], settings))
    expected_ids, expected_tokens, expected_positions = reference.greedy(PROMPT, [CASES.textured("tall")], settings)
    assert (ids, tokens) == (expected_ids, expected_tokens)
    assert torch.equal(positions, expected_positions)
