"""Pruned LLaVA-NeXT (AnyRes) inside the real vLLM engine, on the tiny offline checkpoint.

The engine runs with max_num_batched_tokens=512, smaller than any AnyRes image
(>= 1728 placeholders unpruned) and than the larger pruned budgets used here, so
every test also exercises chunked prefill of image placeholders.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_promprune.anyres import anyres_layout
from vllm_promprune.checkpoints import ANYRES_PINPOINTS
from vllm_promprune.synthetic import scene_image

from engine import assert_bit_identical, greedy_params, image_request, load_reference, run, serving

PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nCompare the two images. ASSISTANT:"
ENGINE_ARGS = dict(
    enforce_eager=True,
    dtype="float32",
    max_model_len=4096,
    max_num_batched_tokens=512,
    enable_prefix_caching=True,
    limit_mm_per_prompt={"image": 2},
    seed=0,
)
# (width, height): square (2 x 2 crops), wide (1 x 3) and tall (3 x 1), the last two letterboxed.
SIZES = {"square": (672, 672), "wide": (1000, 300), "tall": (300, 1000)}
REFERENCE_SEED = 4
REFERENCE_SETTINGS = [
    {"keep": 320},
    {"keep": 320, "budget_mode": "per_crop"},
    {"keep": 1000},  # pruned image split over several prefill chunks
    {"keep": 64, "mu": 0.1},  # all coverage: DPP over every content token
    {"keep": 96, "method": "prunesid", "budget_mode": "per_crop"},
    {"keep": 64, "method": "visionzip"},
    {"keep": 64, "method": "divprune"},
    {"ratio": 0.1, "method": "vispruner", "budget_mode": "per_crop"},
]


def _layout(size: str):  # noqa: ANN202
    width, height = SIZES[size]
    return anyres_layout(height, width, ANYRES_PINPOINTS, 336, 14)


def _image(size: str, seed: int = REFERENCE_SEED):  # noqa: ANN202
    return scene_image(seed, *SIZES[size])


def _request(images: list, settings: dict | None = None, prompt: str = PROMPT) -> dict:
    return image_request(prompt, images, settings)


@pytest.fixture(scope="module")
def stock_llm(tiny_llava_next: Path) -> Iterator[object]:
    from vllm import LLM

    with serving(LLM(str(tiny_llava_next), **ENGINE_ARGS)) as llm:
        yield llm


@pytest.fixture(scope="module")
def pruned_llm(tiny_llava_next: Path) -> Iterator[object]:
    from vllm_promprune.offline import PromPruneLLM

    with serving(PromPruneLLM(str(tiny_llava_next), **ENGINE_ARGS)) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(tiny_llava_next: Path):  # noqa: ANN201
    from transformers import LlavaNextForConditionalGeneration

    from vllm_promprune.reference import PrunedLlavaNextReference

    return load_reference(tiny_llava_next, LlavaNextForConditionalGeneration, PrunedLlavaNextReference)


def _expected(reference, images: list, settings: dict | None, prompt: str = PROMPT):  # noqa: ANN001, ANN202
    prompt_ids = reference.processor.tokenizer(prompt).input_ids
    return reference.greedy(prompt_ids, images, settings, 8)


@pytest.mark.parametrize(
    ("seed", "settings"), [(20, None), (21, {"ratio": 1.0}), (22, {"keep": 100_000, "budget_mode": "per_crop"})]
)
def test_keep_all_is_bit_identical_to_stock(stock_llm, pruned_llm, seed: int, settings: dict | None) -> None:  # noqa: ANN001
    # A fresh image per case: a prefix-cache hit on one side only would change float rounding.
    assert_bit_identical(
        stock_llm, pruned_llm,
        [_request([_image(s, seed)]) for s in SIZES], [_request([_image(s, seed)], settings) for s in SIZES],
    )


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("budget_mode", ["global", "per_crop"])
def test_prompt_is_text_plus_k(stock_llm, pruned_llm, size: str, budget_mode: str) -> None:  # noqa: ANN001
    layout = _layout(size)
    (stock_ids, _), = run(stock_llm, [_request([_image(size)])], max_tokens=1)
    text = len(stock_ids) - layout.num_stock_tokens
    for keep, expected in [(1, 1), (77, 77), (layout.num_content - 1, layout.num_content - 1),
                           (layout.num_content, layout.num_stock_tokens)]:
        settings = {"keep": keep, "budget_mode": budget_mode}
        (ids, tokens), = run(pruned_llm, [_request([_image(size)], settings)], max_tokens=1)
        assert len(ids) == text + expected, (keep, budget_mode)
        assert len(tokens) == 1


@pytest.mark.parametrize("settings", REFERENCE_SETTINGS)
def test_matches_transformers_reference(pruned_llm, reference, settings: dict) -> None:  # noqa: ANN001
    results = run(pruned_llm, [_request([_image(size)], settings) for size in SIZES])
    for size, result in zip(SIZES, results):
        assert result == _expected(reference, [_image(size)], settings), size


def test_prefix_cache_hit_then_different_question(pruned_llm, reference) -> None:  # noqa: ANN001
    image, settings = _image("square", 7), {"keep": 300}
    first = pruned_llm.generate([_request([image], settings)], greedy_params(), use_tqdm=False)[0]
    question = "USER: <image>\nWhere is the largest shape? ASSISTANT:"
    second = pruned_llm.generate([_request([image], settings, question)], greedy_params(), use_tqdm=False)[0]
    assert second.num_cached_tokens >= 128  # image placeholders came from the prefix cache
    assert (list(second.prompt_token_ids), list(second.outputs[0].token_ids)) == _expected(
        reference, [image], settings, question
    )
    assert list(first.outputs[0].token_ids) == _expected(reference, [image], settings)[1]


def test_two_images_with_different_budgets_in_one_request(pruned_llm, reference) -> None:  # noqa: ANN001
    images = [_image("wide", 5), _image("square", 6)]
    settings = {"keep": [48, 200], "budget_mode": "per_crop"}
    (ids, tokens), = run(pruned_llm, [_request(images, settings, TWO_IMAGES)])
    assert (ids, tokens) == _expected(reference, images, settings, TWO_IMAGES)
    image_token = reference.config.image_token_index
    assert sum(1 for t in ids if t == image_token) == 248
    # The wide image is now in vLLM's processor cache with this request's settings;
    # a request that shares only it must still give the new first image its own budget.
    others = [_image("tall", 8), _image("square", 6)]
    assert run(pruned_llm, [_request(others, settings, TWO_IMAGES)])[0] == _expected(
        reference, others, settings, TWO_IMAGES
    )


def test_different_budgets_in_one_batch_equal_solo_runs(pruned_llm) -> None:  # noqa: ANN001
    variants = [{"keep": 64}, {"keep": 512, "budget_mode": "per_crop"}, None, {"keep": 64, "method": "fps"}]
    image = _image("tall", 9)
    solo = [run(pruned_llm, [_request([image], settings)])[0] for settings in variants]
    assert run(pruned_llm, [_request([image], settings) for settings in variants]) == solo
    assert len({len(ids) for ids, _ in solo}) == 3


def test_per_image_budget_list_must_match_images(pruned_llm) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=r"promprune\.keep: a list needs one value per image.*got 3 values for 2"):
        run(pruned_llm, [_request([_image("wide"), _image("tall")], {"keep": [1, 2, 3]}, TWO_IMAGES)])
    with pytest.raises(ValueError, match=r"image 1: .*promprune\.keep"):
        run(pruned_llm, [_request([_image("wide"), _image("tall")], {"keep": [8, 0]}, TWO_IMAGES)])
    assert len(run(pruned_llm, [_request([_image("wide")], {"keep": 8})])[0][1]) == 8
