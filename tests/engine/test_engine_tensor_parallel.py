"""Pruned models under vLLM's tensor parallelism (TP=2: one CPU core per rank).

Every rank runs the tower on its shard of the heads and the same all-reduced
features, so every rank must select the same tokens; the selection each rank
made is recorded in the worker (`LLM.apply_model`) and compared. TP=1 and TP=2
differ only by the all-reduce's float rounding, so on images whose selection
margins exceed that rounding they keep the same tokens too (asserted on AVX-512
CPUs, where it was measured: see `CPU_HAS_AVX512`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from vllm_promprune.reference import load_reference
from vllm_promprune.testing.synthetic import textured_image

from .conftest import CPU_HAS_AVX512, image_request, offline_engine, planned_budget, run

LLAVA_PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
QWEN_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown in the image?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
SETTINGS = [
    {"keep": 16},
    {"keep": 64, "mu": 0.0},
    {"keep": 24, "method": "divprune"},
    {"keep": 24, "method": "vispruner"},
    {"keep": 24, "method": "prunesid"},
    {"keep": 24, "method": "visionzip"},
]
QWEN_SETTINGS = [s for s in SETTINGS if s.get("method") not in ("prunesid", "visionzip")]
ENGINE_ARGS = dict(enforce_eager=True, dtype="float32", max_model_len=2048, enable_prefix_caching=False, seed=0)


def start_recording_selections(model) -> None:
    """In a worker: record every choice pruning makes (run through `LLM.apply_model`):
    the indices of selecting methods, VisionZip's plan (kept, target and merged rows and
    the assignment) instead of its merged vectors."""
    import vllm_promprune.methods.visionzip as visionzip
    import vllm_promprune.pruning as pruning
    from vllm_promprune.methods import METHODS

    recorded: list = []
    select, plan = pruning.reduce_tokens, visionzip._plan

    def recording_select(method: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = select(method, *args, **kwargs)
        if not METHODS[method].merges:
            recorded.append(result.detach().cpu().clone())
        return result

    def recording_plan(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = plan(*args, **kwargs)
        recorded.append(torch.cat([part.detach().cpu().flatten() for part in result]))
        return result

    pruning.reduce_tokens, visionzip._plan = recording_select, recording_plan
    model.recorded_selections = recorded


def take_recorded_selections(model) -> list:
    taken = list(model.recorded_selections)
    model.recorded_selections.clear()
    return taken


@contextmanager
def _engine(model: Path, tensor_parallel_size: int) -> Iterator[object]:
    """A pruned engine whose ranks are worker processes (the engine core runs in this
    process) and record their selections."""
    engine_args = {**ENGINE_ARGS, "tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "mp"}
    with offline_engine(model, engine_args, pruned=True) as llm:
        llm.apply_model(start_recording_selections)
        yield llm


@pytest.fixture(scope="module")
def two_cores_bound() -> Iterator[None]:
    """vLLM-CPU binds each TP rank's threads to NUMA nodes; this sandbox needs them by hand."""
    previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    yield
    if previous is None:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous


def _selections_and_outputs(llm, requests: list[dict]) -> tuple[list[list[torch.Tensor]], list]:
    """Per rank, each request's selection (run one at a time), and the outputs."""
    per_rank: list[list[torch.Tensor]] | None = None
    outputs = []
    llm.apply_model(take_recorded_selections)
    for request in requests:
        outputs += run(llm, [request], max_tokens=4)
        taken = llm.apply_model(take_recorded_selections)
        if per_rank is None:
            per_rank = [[] for _ in taken]
        for rank, selections in enumerate(taken):
            assert len(selections) == 1, "one selection per request"
            per_rank[rank].append(selections[0])
    return per_rank or [], outputs


def _check_family(model: Path, requests: list[dict], keeps: list[int], *, against_tp1: bool) -> None:
    """TP=2 ranks select alike and prompts are text + K; with `against_tp1` (AVX-512 CPUs,
    where it was measured), a TP=1 engine selects the same tokens as TP=2."""
    if against_tp1:
        with _engine(model, 1) as llm:
            (single,), _ = _selections_and_outputs(llm, requests)
    with _engine(model, 2) as llm:
        (rank0, rank1), outputs = _selections_and_outputs(llm, requests)
        unpruned = run(llm, [{**requests[0], "mm_processor_kwargs": {"promprune": {"keep": None}}}], max_tokens=1)[0][0]
        config = llm.llm_engine.model_config.hf_config
    for index, (zero, one) in enumerate(zip(rank0, rank1, strict=True)):
        assert torch.equal(zero, one), f"request {index}: the two ranks selected differently"
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    text = len(unpruned) - unpruned.count(image_token)
    for (ids, tokens), keep in zip(outputs, keeps, strict=True):
        assert len(ids) == text + keep
        assert ids.count(image_token) == keep
        assert len(tokens) == 4
    if against_tp1:  # margins exceed the all-reduce rounding on these images
        assert [torch.equal(a, b) for a, b in zip(single, rank0, strict=True)] == [True] * len(requests)


def test_llava_tp2(tiny_llava: Path, two_cores_bound: None) -> None:

    requests = [image_request(LLAVA_PROMPT, [textured_image(seed)], s) for seed, s in enumerate(SETTINGS)]
    # Adaptive budgets: the planning pass runs on both ranks (the tower is sharded), each
    # keeps the rows, and the request takes them: still one selection per request and rank.
    requests.append(image_request(LLAVA_PROMPT, [textured_image(1)], {"method": "prunesid_dyn", "keep": 32, "phi_ref": 0.4}))
    keeps = [s["keep"] for s in SETTINGS] + [planned_budget(load_reference(tiny_llava), textured_image(1), 32, "phi", 0.4)]
    _check_family(tiny_llava, requests, keeps, against_tp1=CPU_HAS_AVX512)


def test_qwen2_5_vl_tp2(tiny_qwen2_5_vl: Path, two_cores_bound: None) -> None:
    requests = [
        image_request(QWEN_PROMPT, [textured_image(seed, 448, 448)], s) for seed, s in enumerate(QWEN_SETTINGS)
    ]
    _check_family(tiny_qwen2_5_vl, requests, [s["keep"] for s in QWEN_SETTINGS], against_tp1=CPU_HAS_AVX512)


def test_qwen2_vl_tp2(tiny_qwen2_vl: Path, two_cores_bound: None) -> None:
    # Qwen2-VL's q and k come through `split_qkv` (an all-gather, then this rank's heads):
    # the ranks must still select the same tokens, with prompts of text + K (checked in
    # _check_family). TP=1 vs TP=2 equality was not measured on AVX-512, so no TP=1 engine.
    requests = [
        image_request(QWEN_PROMPT, [textured_image(seed, 448, 448)], s) for seed, s in enumerate(QWEN_SETTINGS)
    ]
    _check_family(tiny_qwen2_vl, requests, [s["keep"] for s in QWEN_SETTINGS], against_tp1=False)


def test_qwen3_vl_tp2(tiny_qwen3_vl: Path, two_cores_bound: None) -> None:
    # Qwen3-VL's tower and its deepstack mergers are sharded over the ranks; the ranks must
    # select the same tokens, prompts text + K. TP=1 vs TP=2 equality was not measured on
    # AVX-512, so no TP=1 engine. Qwen3-VL-MoE shares this tower and pruning code (only the
    # LLM's experts differ, sharded by vLLM itself), so it is not run a second time here.
    requests = [
        image_request(QWEN_PROMPT, [textured_image(seed, 512, 512)], s) for seed, s in enumerate(QWEN_SETTINGS)
    ]
    _check_family(tiny_qwen3_vl, requests, [s["keep"] for s in QWEN_SETTINGS], against_tp1=False)
