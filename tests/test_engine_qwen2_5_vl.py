"""Pruned Qwen2.5-VL inside the real vLLM engine, on the tiny offline checkpoint.

Positions are checked directly: the positions vLLM's language model receives
(recorded with `LLM.apply_model`) must equal transformers' `get_rope_index`
positions of the UNPRUNED prompt restricted to the kept tokens. The engine runs
with max_num_batched_tokens=96, smaller than every image here, so image
placeholders are always split over several prefill steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vllm_promprune.synthetic import scene_image

from engine import greedy_params, run, start_recording_positions, take_recorded_positions

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"<|im_start|>user\n{IMAGE}What is shown in the image?<|im_end|>\n<|im_start|>assistant\n"
TWO_IMAGES = f"<|im_start|>user\n{IMAGE}{IMAGE}Compare the two images.<|im_end|>\n<|im_start|>assistant\n"
ENGINE_ARGS = dict(
    enforce_eager=True,
    dtype="float32",
    max_model_len=4096,
    max_num_batched_tokens=96,
    enable_prefix_caching=True,
    limit_mm_per_prompt={"image": 2, "video": 1},
    seed=0,
)
# (width, height) -> merged grid (h, w): square 16 x 16, wide 8 x 24, tall 24 x 8.
SIZES = {"square": (448, 448), "wide": (672, 224), "tall": (224, 672)}
GRIDS = {"square": (16, 16), "wide": (8, 24), "tall": (24, 8)}
REFERENCE_SEED = 4
REFERENCE_SETTINGS = [
    {"keep": 64},  # PromPrune, mu 0.5744 (Qwen default)
    {"keep": 40, "mu": 0.0},  # all coverage (DPP)
    {"keep": 40, "mu": 1.0},  # all saliency (received attention)
    {"keep": 100, "order": "selection"},  # kept tokens not in raster order
    {"keep": 48, "method": "divprune"},
    {"keep": 48, "method": "vispruner"},
    {"ratio": 0.3, "method": "fps"},
]


def _image(size: str, seed: int = REFERENCE_SEED):  # noqa: ANN202
    return scene_image(seed, *SIZES[size])


def _request(images: list, settings: dict | None = None, prompt: str = PROMPT) -> dict:
    request: dict = {"prompt": prompt, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}
    if settings is not None:
        request["mm_processor_kwargs"] = {"promprune": settings}
    return request


@pytest.fixture(scope="module")
def stock_llm(tiny_qwen2_5_vl: Path) -> Iterator[object]:
    from vllm import LLM

    llm = LLM(str(tiny_qwen2_5_vl), **ENGINE_ARGS)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def pruned_llm(tiny_qwen2_5_vl: Path) -> Iterator[object]:
    import os

    from vllm_promprune.offline import PromPruneLLM

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships test functions to the worker
    llm = PromPruneLLM(str(tiny_qwen2_5_vl), **ENGINE_ARGS)
    llm.apply_model(start_recording_positions)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_qwen2_5_vl: Path):  # noqa: ANN201
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vllm_promprune.reference import PrunedQwen2_5_VLReference

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen2_5_vl, attn_implementation="eager")
    return PrunedQwen2_5_VLReference(model, AutoProcessor.from_pretrained(tiny_qwen2_5_vl))


def _solo_with_positions(llm, request: dict, max_tokens: int = 8):  # noqa: ANN001, ANN202
    """(prompt ids, tokens, positions of the prompt tokens) of one request run alone."""
    llm.apply_model(take_recorded_positions)  # drop anything recorded before
    (ids, tokens), = run(llm, [request], max_tokens=max_tokens)
    (positions,) = llm.apply_model(take_recorded_positions)
    generated = positions[:, len(ids):]
    next_position = int(positions[:, : len(ids)].max()) + 1
    assert torch.equal(generated, (torch.arange(generated.shape[1]) + next_position).expand(3, -1))
    return ids, tokens, positions[:, : len(ids)]


@pytest.mark.parametrize(("seed", "settings"), [(20, None), (21, {"ratio": 1.0}), (22, {"keep": 100_000})])
def test_keep_all_is_bit_identical_to_stock(stock_llm, pruned_llm, seed: int, settings: dict | None) -> None:  # noqa: ANN001
    stock = stock_llm.generate([_request([_image(s, seed)]) for s in SIZES], greedy_params(logprobs=3), use_tqdm=False)
    pruned = pruned_llm.generate(
        [_request([_image(s, seed)], settings) for s in SIZES], greedy_params(logprobs=3), use_tqdm=False
    )
    for s, p in zip(stock, pruned):
        assert p.prompt_token_ids == s.prompt_token_ids
        assert p.outputs[0].token_ids == s.outputs[0].token_ids
        assert p.outputs[0].logprobs == s.outputs[0].logprobs  # exact floats


@pytest.mark.parametrize("size", sorted(SIZES))
def test_prompt_is_text_plus_k(stock_llm, pruned_llm, size: str) -> None:  # noqa: ANN001
    (stock_ids, _), = run(stock_llm, [_request([_image(size)])], max_tokens=1)
    h, w = GRIDS[size]
    for keep in (1, 17, h * w - 1):
        (ids, _), = run(pruned_llm, [_request([_image(size)], {"keep": keep})], max_tokens=1)
        assert len(ids) == len(stock_ids) - h * w + keep


@pytest.mark.parametrize("size", sorted(SIZES))
def test_kept_tokens_carry_true_grid_positions(pruned_llm, reference, size: str) -> None:  # noqa: ANN001
    """The position check: vLLM's positions vs the grid cells of the kept tokens."""
    settings = {"keep": 50}
    ids, tokens, positions = _solo_with_positions(pruned_llm, _request([_image(size)], settings))
    expected_ids, expected_tokens, expected_positions = reference.greedy(PROMPT, [_image(size)], settings)
    assert (ids, tokens) == (expected_ids, expected_tokens)
    assert torch.equal(positions, expected_positions)
    image = torch.tensor(ids) == reference.config.image_token_id
    start = int(positions[0, image].min())
    rows, cols = positions[1, image] - start, positions[2, image] - start
    h, w = GRIDS[size]
    assert bool((positions[0, image] == start).all()) and int(rows.max()) < h and int(cols.max()) < w
    first_text_after = int(image.nonzero().max()) + 1
    assert positions[:, first_text_after].tolist() == [start + max(h, w)] * 3  # as in the unpruned prompt


@pytest.mark.parametrize("settings", REFERENCE_SETTINGS)
def test_matches_transformers_reference(pruned_llm, reference, settings: dict) -> None:  # noqa: ANN001
    results = run(pruned_llm, [_request([_image(size)], settings) for size in SIZES])
    for size, result in zip(SIZES, results):
        expected_ids, expected_tokens, _ = reference.greedy(PROMPT, [_image(size)], settings)
        assert result == (expected_ids, expected_tokens), size


def test_prefix_cache_hit_then_different_question(pruned_llm, reference) -> None:  # noqa: ANN001
    image, settings = _image("square", 7), {"keep": 200}
    question = f"<|im_start|>user\n{IMAGE}Where is the largest shape?<|im_end|>\n<|im_start|>assistant\n"
    run(pruned_llm, [_request([image], settings)])
    pruned_llm.apply_model(take_recorded_positions)
    output = pruned_llm.generate([_request([image], settings, question)], greedy_params(), use_tqdm=False)[0]
    (positions,) = pruned_llm.apply_model(take_recorded_positions)
    assert output.num_cached_tokens >= 128  # the image's placeholders came from the prefix cache
    expected_ids, expected_tokens, expected_positions = reference.greedy(question, [image], settings)
    assert (list(output.prompt_token_ids), list(output.outputs[0].token_ids)) == (expected_ids, expected_tokens)
    computed = len(expected_ids) - output.num_cached_tokens
    assert torch.equal(positions[:, :computed], expected_positions[:, output.num_cached_tokens :])


def test_two_images_of_different_sizes_and_budgets_in_one_request(pruned_llm, reference) -> None:  # noqa: ANN001
    images, settings = [_image("tall", 5), _image("wide", 6)], {"keep": [30, 120]}
    ids, tokens, positions = _solo_with_positions(pruned_llm, _request(images, settings, TWO_IMAGES))
    expected_ids, expected_tokens, expected_positions = reference.greedy(TWO_IMAGES, images, settings)
    assert (ids, tokens) == (expected_ids, expected_tokens)
    assert torch.equal(positions, expected_positions)
    assert sum(1 for t in ids if t == reference.config.image_token_id) == 150


def test_different_budgets_in_one_batch_equal_solo_runs(pruned_llm) -> None:  # noqa: ANN001
    variants = [{"keep": 64}, {"keep": 150, "order": "selection"}, None, {"keep": 64, "method": "uniform"}]
    image = _image("wide", 9)
    solo = [run(pruned_llm, [_request([image], settings)])[0] for settings in variants]
    assert run(pruned_llm, [_request([image], settings) for settings in variants]) == solo
    assert len({len(ids) for ids, _ in solo}) == 3


@pytest.mark.parametrize("method", ["prunesid", "visionzip"])
def test_methods_needing_a_cls_token_are_refused(pruned_llm, method: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=rf"promprune\.method '{method}' needs .*Qwen2\.5-VL"):
        run(pruned_llm, [_request([_image("square")], {"keep": 8, "method": method})])
    assert len(run(pruned_llm, [_request([_image("square")], {"keep": 8})])[0][1]) == 8
