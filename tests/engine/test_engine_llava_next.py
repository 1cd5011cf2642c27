"""Pruned LLaVA-NeXT (AnyRes) inside the real vLLM engine, on the tiny offline checkpoint.

The engine runs with max_num_batched_tokens=512, smaller than any AnyRes image
(>= 1728 placeholders unpruned) and than the larger pruned budgets used here, so
every test also exercises chunked prefill of image placeholders.

Tests that compare with the transformers reference use seeded textured images
(every visual token distinct), whose selections have margins far above the float
rounding between the two pipelines (`test_reference_cases_have_margins`); the
others use seeded scenes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_promprune.families.anyres import anyres_layout, split_budget
from vllm_promprune.testing.checkpoints import ANYRES_PINPOINTS

from .conftest import (
    ImageCases,
    assert_bit_identical,
    assert_stock_prompts_match_transformers,
    engine_selections,
    engine_tower_outputs,
    greedy_params,
    guard_noise,
    jittered,
    max_differences,
    offline_engine,
    planned_budget,
    run,
    same_selections,
    selections,
    tower_runs,
)

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
# Textured images (Hn of the content tokens 0.70..0.75) whose selections under the settings
# below keep margins above float noise (checked by test_reference_cases_have_margins).
REFERENCE_SEEDS = {"square": 9, "wide": 2, "tall": 23}
CASES = ImageCases(PROMPT, SIZES, REFERENCE_SEEDS)
REFERENCE_SETTINGS = [
    {"keep": 320, "mu": 0.95},  # Hn < mu: all saliency
    {"keep": 320, "budget_mode": "per_crop", "mu": 0.95},
    {"keep": 1000, "mu": 0.95},  # pruned image split over several prefill chunks
    # All coverage: DPP over every content token. Greedy DPP picks beyond the LLM width
    # (128 here) have residual gains ~0 that float noise orders, hence 64 and no 320 / 1000.
    {"keep": 64, "mu": 0.1},
    {"keep": 96, "method": "prunesid", "budget_mode": "per_crop"},
    {"keep": 64, "method": "visionzip"},
    {"keep": 64, "method": "divprune"},
    # VisPruner splits its residual tokens by their place in the CLS-attention order (see
    # test_engine_llava.py): per view, 98% of the budget by attention and one or two rounds
    # over the ~20 least salient tokens, where that order has margins.
    {"ratio": 0.99, "method": "vispruner", "important_ratio": 0.98, "budget_mode": "per_crop"},
    {"keep": 64, "method": "cdpruner"},  # by PROMPT's instruction
    {"keep": 96, "method": "cdpruner", "budget_mode": "per_crop"},
]
QUESTION = "USER: <image>\nRead the text on the sign. ASSISTANT:"  # CDPruner under another question
# The other comparisons with the reference: (images by (size, seed), settings).
PREFIX_CASE = ([("square", 7)], {"keep": 300, "mu": 0.95})
TWO_IMAGE_CASES = [
    ([("wide", 4), ("square", 5)], {"keep": [48, 200], "budget_mode": "per_crop"}),
    ([("tall", 8), ("square", 5)], {"keep": [48, 200], "budget_mode": "per_crop"}),
]
CDPRUNER_CASES = [  # (images, settings, prompt)
    ([("square", 9)], {"keep": 64, "method": "cdpruner"}, QUESTION),
    ([("wide", 2)], {"keep": 96, "method": "cdpruner", "budget_mode": "per_crop"}, QUESTION),
    ([("wide", 4), ("square", 5)], {"keep": [48, 64], "method": "cdpruner", "budget_mode": "per_crop"}, TWO_IMAGES),
]
# Floor of the margin guard's noise std; it uses 10x the vLLM-vs-transformers max abs
# difference it measures on the machine it runs on when that is larger (`guard_noise`).
# Measured 2026-12-01 on these images: hidden 4.6e-6, CLS attention 5.8e-10, keys 5.7e-7;
# projected features 7.1e-8, which the floor moves by 6.2e-6. The cases' selections first
# change at 2x to >100x the floor (5 draws per scale; the weakest: keep=1000 by attention
# and VisionZip).
JITTER_FLOOR = {"hidden": 6e-5, "saliency": 8e-9, "keys": 8e-6}


def _layout(size: str):  # noqa: ANN202
    width, height = SIZES[size]
    return anyres_layout(height, width, ANYRES_PINPOINTS, 336, 14)


@pytest.fixture(scope="module")
def stock_llm(tiny_llava_next: Path) -> Iterator[object]:
    with offline_engine(tiny_llava_next, ENGINE_ARGS, pruned=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def pruned_llm(tiny_llava_next: Path) -> Iterator[object]:
    with offline_engine(tiny_llava_next, ENGINE_ARGS, pruned=True) as llm:  # the margin guard records tower outputs
        yield llm


@pytest.fixture(scope="module")
def reference(tiny_llava_next: Path):  # noqa: ANN201
    from vllm_promprune.reference import load_reference

    return load_reference(tiny_llava_next)


def _expected(reference, images: list, settings: dict | None, prompt: str = PROMPT):  # noqa: ANN202
    prompt_ids = reference.processor.tokenizer(prompt).input_ids
    return reference.greedy(prompt_ids, images, settings, 8)


def test_stock_vllm_expands_prompts_like_transformers(stock_llm, tiny_llava_next: Path) -> None:
    assert_stock_prompts_match_transformers(stock_llm, tiny_llava_next, CASES)  # square and two letterboxed grids


@pytest.mark.parametrize(
    ("seed", "settings"), [(20, None), (21, {"ratio": 1.0}), (22, {"keep": 100_000, "budget_mode": "per_crop"})]
)
def test_keep_all_is_bit_identical_to_stock(stock_llm, pruned_llm, seed: int, settings: dict | None) -> None:
    # A fresh image per case: a prefix-cache hit on one side only would change float rounding.
    assert_bit_identical(
        stock_llm, pruned_llm,
        [CASES.request([CASES.scene(s, seed)]) for s in SIZES], [CASES.request([CASES.scene(s, seed)], settings) for s in SIZES],
    )


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("budget_mode", ["global", "per_crop"])
def test_prompt_is_text_plus_k(stock_llm, pruned_llm, size: str, budget_mode: str) -> None:
    layout = _layout(size)
    (stock_ids, _), = run(stock_llm, [CASES.request([CASES.scene(size)])], max_tokens=1)
    text = len(stock_ids) - layout.num_stock_tokens
    for keep, expected in [(1, 1), (77, 77), (layout.num_content - 1, layout.num_content - 1),
                           (layout.num_content, layout.num_stock_tokens)]:
        settings = {"keep": keep, "budget_mode": budget_mode}
        (ids, tokens), = run(pruned_llm, [CASES.request([CASES.scene(size)], settings)], max_tokens=1)
        assert len(ids) == text + expected, (keep, budget_mode)
        assert len(tokens) == 1


@pytest.mark.parametrize("settings", REFERENCE_SETTINGS)
def test_matches_transformers_reference(pruned_llm, reference, settings: dict) -> None:
    results = run(pruned_llm, [CASES.request([CASES.textured(size)], settings) for size in SIZES])
    for size, result in zip(SIZES, results):
        assert result == _expected(reference, [CASES.textured(size)], settings), size


def test_prefix_cache_hit_then_different_question(pruned_llm, reference) -> None:
    (image,), settings = ([CASES.textured(size, seed) for size, seed in PREFIX_CASE[0]], PREFIX_CASE[1])
    first = pruned_llm.generate([CASES.request([image], settings)], greedy_params(), use_tqdm=False)[0]
    question = "USER: <image>\nWhere is the largest shape? ASSISTANT:"
    second = pruned_llm.generate([CASES.request([image], settings, question)], greedy_params(), use_tqdm=False)[0]
    assert second.num_cached_tokens >= 128  # image placeholders came from the prefix cache
    assert (list(second.prompt_token_ids), list(second.outputs[0].token_ids)) == _expected(
        reference, [image], settings, question
    )
    assert list(first.outputs[0].token_ids) == _expected(reference, [image], settings)[1]


def test_each_image_is_identified_by_its_own_settings(pruned_llm) -> None:
    """vLLM's processing, encoder and prefix caches key an image by its content and ITS
    resolved settings only: not by the settings of the other images in the request."""
    wide, tall = CASES.scene("wide", 30), CASES.scene("tall", 31)
    (ids, _), = run(pruned_llm, [CASES.request([wide, wide], {"keep": 50}, TWO_IMAGES)], max_tokens=1)
    text = len(ids) - 100
    for budgets in ([3, 100], [100, 3]):  # two copies of one image, each with its own budget
        (ids, _), = run(pruned_llm, [CASES.request([wide, wide], {"keep": budgets}, TWO_IMAGES)], max_tokens=1)
        assert len(ids) == text + 103, budgets
    # Only the first image's budget changes: the second comes from the encoder cache (the
    # prefix cache cannot cover it: it follows the changed image).
    views = {size: _layout(size).num_views for size in ("wide", "tall")}
    assert tower_runs(pruned_llm, [CASES.request([tall, wide], {"keep": [30, 48]}, TWO_IMAGES)]) == views["tall"] + views["wide"]
    assert tower_runs(pruned_llm, [CASES.request([tall, wide], {"keep": [31, 48]}, TWO_IMAGES)]) == views["tall"]


def test_two_images_with_different_budgets_in_one_request(pruned_llm, reference) -> None:
    (first_images, settings), (second_images, _) = TWO_IMAGE_CASES
    images = [CASES.textured(size, seed) for size, seed in first_images]
    (ids, tokens), = run(pruned_llm, [CASES.request(images, settings, TWO_IMAGES)])
    assert (ids, tokens) == _expected(reference, images, settings, TWO_IMAGES)
    image_token = reference.config.image_token_index
    assert sum(1 for t in ids if t == image_token) == 248
    # The wide image is now in vLLM's processor cache with this request's settings;
    # a request that shares only it must still give the new first image its own budget.
    others = [CASES.textured(size, seed) for size, seed in second_images]
    assert run(pruned_llm, [CASES.request(others, settings, TWO_IMAGES)])[0] == _expected(
        reference, others, settings, TWO_IMAGES
    )


@pytest.mark.parametrize("case", CDPRUNER_CASES, ids=["global", "per_crop", "two_images"])
def test_cdpruner_under_another_question_matches_the_reference(pruned_llm, reference, case: tuple) -> None:
    case_images, settings, prompt = case
    images = [CASES.textured(size, seed) for size, seed in case_images]
    assert run(pruned_llm, [CASES.request(images, settings, prompt)]) == [_expected(reference, images, settings, prompt)]


@pytest.mark.parametrize("budget_mode", ["global", "per_crop"])
def test_cdpruner_keeps_other_tokens_for_another_question(pruned_llm, budget_mode: str) -> None:
    settings = {"keep": 70, "method": "cdpruner", "budget_mode": budget_mode}
    image = CASES.textured("tall", 50)
    under_prompt, under_question = engine_selections(
        pruned_llm, [CASES.request([image], settings), CASES.request([image], settings, QUESTION)]
    )
    assert under_prompt and under_question
    assert not same_selections(under_prompt, under_question)


def test_reference_cases_have_margins(pruned_llm, reference) -> None:
    """Guards the comparisons with the reference above (see test_engine_llava.py).

    Measures the engine-vs-reference difference of the tower outputs on every image
    they use, derives the noise from it (`guard_noise`: 10x, at least JITTER_FLOOR; it
    must also move the projected features 10x as far), checks the PromPrune splits, and
    checks that this noise on the reference's tower outputs leaves every selection
    (indices, VisionZip plans) exactly as it is.
    """
    import torch

    from vllm_promprune.families.anyres import prune_anyres
    from vllm_promprune.methods import PromPruneOptions, saliency_budget, spectral_entropy
    from vllm_promprune.reference import instruction_embeddings
    from vllm_promprune.settings import parse_image_settings

    projector = reference.model.model.multi_modal_projector
    cases = [([(size, REFERENCE_SEEDS[size])], raw, PROMPT) for raw in REFERENCE_SETTINGS for size in SIZES]
    cases += [(*PREFIX_CASE, PROMPT), *((case_images, raw, TWO_IMAGES) for case_images, raw in TWO_IMAGE_CASES)]
    cases += CDPRUNER_CASES
    images = sorted({image for case_images, _, _ in cases for image in case_images})
    towers = {}
    for size, seed in images:
        processed = reference.processor.image_processor([CASES.textured(size, seed)], return_tensors="pt")
        layout = _layout(size)
        towers[size, seed] = (layout, reference.tower_output(processed["pixel_values"][0][: layout.num_views]))

    requests = [CASES.request([CASES.textured(size, seed)], {"keep": 15}) for size, seed in images]  # settings not used before
    engine = engine_tower_outputs(pruned_llm, requests)
    with torch.inference_mode():
        ours = [(t.hidden, t.saliency, t.keys, projector(t.hidden[:, 1:])) for _, t in towers.values()]
        measured = max_differences(engine, ours)
        noise = guard_noise(measured, JITTER_FLOOR)
        generator = torch.Generator().manual_seed(0)
        moved = max(
            float((projector(jittered(t, noise, generator).hidden[:, 1:]) - projector(t.hidden[:, 1:])).abs().max())
            for _, t in towers.values()
        )
    for field in ("hidden", "saliency", "keys"):  # the engine really differs from the reference here
        assert 0 < measured[field], (field, measured)
    assert moved >= 10 * measured["projected"] > 0, (moved, measured)

    for size in SIZES:  # the PromPrune splits the settings claim (global, and per view)
        layout, tower = towers[size, REFERENCE_SEEDS[size]]
        with torch.inference_mode():
            tokens = projector(tower.hidden[:, 1:].flatten(0, 1)[layout.content_index])
            entropy = spectral_entropy(tokens)
            view_entropies = [spectral_entropy(tokens[layout.view_of == v]) for v in range(layout.num_views)]
        assert saliency_budget(entropy, 1000, PromPruneOptions(mu=0.95)) == 1000
        assert saliency_budget(entropy, 320, PromPruneOptions(mu=0.95)) == 320
        assert saliency_budget(entropy, 64, PromPruneOptions(mu=0.1)) == 0
        for view_entropy, share in zip(view_entropies, split_budget(320, layout.view_sizes())):
            assert saliency_budget(view_entropy, share, PromPruneOptions(mu=0.95)) == share

    for case_images, raw, prompt in cases:
        settings = parse_image_settings(raw, len(case_images))
        # Embedding lookups are exact in both (same weights): the instruction gets no noise.
        prompt_ids = reference.processor.tokenizer(prompt).input_ids
        instructions = instruction_embeddings(reference.model, reference.processor, prompt_ids, settings)
        for (size, seed), image_settings, instruction in zip(case_images, settings, instructions):
            layout, tower = towers[size, seed]

            def prune(t, layout=layout, image_settings=image_settings, instruction=instruction):  # noqa: ANN202
                return prune_anyres(t, layout, image_settings, projector, instruction=instruction)

            clean = selections(prune, tower)
            assert clean, (size, seed, raw)
            for _ in range(3):
                noisy = selections(prune, jittered(tower, noise, generator))
                assert same_selections(noisy, clean), (size, seed, raw)


def test_different_budgets_in_one_batch_equal_solo_runs(pruned_llm) -> None:
    variants = [{"keep": 64}, {"keep": 512, "budget_mode": "per_crop"}, None, {"keep": 64, "method": "fps"}]
    image = CASES.scene("tall", 9)
    solo = [run(pruned_llm, [CASES.request([image], settings)])[0] for settings in variants]
    assert run(pruned_llm, [CASES.request([image], settings) for settings in variants]) == solo
    assert len({len(ids) for ids, _ in solo}) == 3


def start_counting_selections(model) -> None:
    """In the worker: record the batch size of every selection pruning runs, with a tower
    micro-batch of two largest images, as vLLM's profile gives a server whose token budget
    holds two unpruned images (here 512 tokens: one image per micro-batch)."""
    import vllm_promprune.pruning as pruning

    reduce_tokens, counted = pruning.reduce_tokens, []

    def counting(method: str, batch, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        counted.append(batch.features.shape[0])
        return reduce_tokens(method, batch, *args, **kwargs)

    pruning.reduce_tokens = counting
    model.counted_selections = (reduce_tokens, counted, model.views_per_batch)
    model.views_per_batch *= 2


def take_counted_selections(model) -> list[int]:
    import vllm_promprune.pruning as pruning

    pruning.reduce_tokens, counted, model.views_per_batch = model.counted_selections
    del model.counted_selections
    return counted


@pytest.mark.parametrize("budget_mode", ["global", "per_crop"])
def test_images_of_one_layout_select_as_one_batch(pruned_llm, budget_mode: str) -> None:
    """Two different images of one layout with one budget cost the selections of one image."""
    settings = {"keep": 40, "method": "divprune", "budget_mode": budget_mode}
    images = [CASES.scene("wide", 40 + (budget_mode == "per_crop")), CASES.scene("wide", 42)]
    pruned_llm.apply_model(start_counting_selections)
    run(pruned_llm, [CASES.request(images, settings, TWO_IMAGES)], max_tokens=1)
    (counted,) = pruned_llm.apply_model(take_counted_selections)
    if budget_mode == "global":  # one selection over each image's content tokens
        assert counted == [2]
        return
    layout = _layout("wide")
    views = [(int((layout.view_of == view).sum()), share)
             for view, share in enumerate(split_budget(40, layout.view_sizes())) if share]
    assert len(counted) == len(set(views)), counted  # views of equal size and share batch too
    assert sum(counted) == 2 * len(views)


def test_per_image_budget_list_must_match_images(pruned_llm) -> None:
    with pytest.raises(ValueError, match=r"promprune\.keep: a list needs one value per image.*got 3 values for 2"):
        run(pruned_llm, [CASES.request([CASES.scene("wide"), CASES.scene("tall")], {"keep": [1, 2, 3]}, TWO_IMAGES)])
    with pytest.raises(ValueError, match=r"image 1: .*promprune\.keep"):
        run(pruned_llm, [CASES.request([CASES.scene("wide"), CASES.scene("tall")], {"keep": [8, 0]}, TWO_IMAGES)])
    assert len(run(pruned_llm, [CASES.request([CASES.scene("wide")], {"keep": 8})])[0][1]) == 8


@pytest.mark.parametrize("budget_mode", ["global", "per_crop"])
def test_prunesid_dyn_budgets_follow_phi_and_match_the_reference(pruned_llm, reference, budget_mode: str) -> None:
    """Adaptive budgets (docs/dynamic-budgets.md): K_i from the phi of the image's content
    tokens, planned once, then the reference's rows for that fixed K_i; the planning pass's
    rows serve the request (one tower run per view)."""
    keep, phi_ref = 96, 0.4
    settings = {"method": "prunesid_dyn", "keep": keep, "phi_ref": phi_ref, "budget_mode": budget_mode}
    images = [CASES.textured(size) for size in SIZES]
    results = run(pruned_llm, [CASES.request([image], settings) for image in images])
    budgets = []
    for size, image, result in zip(SIZES, images, results):
        budgets.append(planned_budget(reference, image, keep, "phi", phi_ref))
        fixed = {"method": "prunesid", "keep": budgets[-1], "budget_mode": budget_mode}
        assert result == _expected(reference, [image], fixed), size
    assert len(set(budgets)) == len(SIZES)
    scenes = [CASES.request([CASES.scene(size, 30 + (budget_mode == "global"))], settings) for size in SIZES]
    assert tower_runs(pruned_llm, scenes) == sum(_layout(size).num_views for size in SIZES)
