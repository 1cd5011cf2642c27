"""On a GPU, as users serve: CUDA graphs on (enforce_eager=False), bfloat16 (`scripts/gpu-check.sh`).

Skipped, and reported as skipped, where CUDA is missing (CI on the CPU machines). What only
a GPU shows: CUDA graphs replay against captured addresses (a positions tensor the model
made itself would be ignored, so pruned Qwen tokens would keep the first K grid positions),
and vLLM sizes the KV cache from a measured profile that must hold selection's peak.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .conftest import assert_bit_identical, offline_engine, run
from .test_engine_qwen import FAMILIES, GRID_SETTINGS, PROMPT, _recording_engine, _solo_with_positions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GPU_ARGS = dict(enforce_eager=False, dtype="bfloat16", gpu_memory_utilization=0.4)
LLAVA_PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"


def _llava_request(seed: int, settings: dict | None = None) -> dict:
    from vllm_promprune.testing.synthetic import scene_image

    request: dict = {"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": scene_image(seed)}}
    if settings is not None:
        request["mm_processor_kwargs"] = {"promprune": settings}
    return request


@pytest.fixture(scope="module")
def qwen_pruned(tiny_qwen2_5_vl: Path) -> Iterator[object]:
    with _recording_engine(tiny_qwen2_5_vl, pruned=True, in_process=False, **GPU_ARGS) as llm:
        yield llm


@pytest.mark.parametrize("settings", [None, {"keep": 100_000}])
def test_keep_all_is_bit_identical_to_stock_with_cuda_graphs(
    tiny_llava: Path, tiny_qwen2_5_vl: Path, settings: dict | None
) -> None:
    cases = FAMILIES["qwen2.5-vl"].images.cases
    for model, stock_requests, pruned_requests in [
        (tiny_llava, [_llava_request(s) for s in (0, 1)], [_llava_request(s, settings) for s in (0, 1)]),
        (tiny_qwen2_5_vl, [cases.request([cases.scene("wide", s)]) for s in (0, 1)],
         [cases.request([cases.scene("wide", s)], settings) for s in (0, 1)]),
    ]:
        engine_args = {**GPU_ARGS, "max_model_len": 4096}
        with (offline_engine(model, engine_args, pruned=False, in_process=False) as stock,
              offline_engine(model, engine_args, pruned=True, in_process=False) as pruned):
            assert_bit_identical(stock, pruned, stock_requests, pruned_requests)


def test_pruned_qwen_tokens_keep_their_grid_positions_under_cuda_graphs(qwen_pruned, tiny_qwen2_5_vl: Path) -> None:
    """`uniform` keeps the same tokens whatever the rounding, so positions are exact in bf16."""
    from vllm_promprune.reference import load_reference

    settings = {**GRID_SETTINGS, "method": "uniform"}
    image = FAMILIES["qwen2.5-vl"].images.cases.textured("wide")
    ids, _, positions = _solo_with_positions(qwen_pruned, FAMILIES["qwen2.5-vl"].images.cases.request([image], settings))
    expected_ids, _, expected_positions = load_reference(tiny_qwen2_5_vl).greedy(PROMPT, [image], settings)
    assert ids == expected_ids
    assert torch.equal(positions, expected_positions)


def _reset_peak(model) -> None:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def _peaks(model) -> tuple[list[int], int]:
    from vllm_promprune.engine.models.common import PROFILED_PEAK_BYTES

    torch.cuda.synchronize()
    return list(PROFILED_PEAK_BYTES), torch.cuda.max_memory_allocated()


def test_selection_at_the_largest_image_stays_inside_the_memory_profile(qwen_pruned) -> None:
    """A request pruning a maximum-size image with each greedy method peaks no higher than
    vLLM's profiling run, which the KV cache was sized from."""
    from vllm_promprune.testing.synthetic import scene_image

    cases = FAMILIES["qwen2.5-vl"].images.cases
    for method in ("promprune", "facility_location", "divprune"):
        qwen_pruned.apply_model(_reset_peak)
        image = scene_image(3, 2048, 2048)  # resized to the processor's largest image
        run(qwen_pruned, [cases.request([image], {"keep": 64, "method": method})], max_tokens=1)
        ((profiled, peak),) = qwen_pruned.apply_model(_peaks)
        assert profiled, "the memory profile ran no selection"
        assert peak <= max(profiled), (method, peak, profiled)
