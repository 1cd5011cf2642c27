"""Pruned LLaVA-1.5 inside the real vLLM engine, on the tiny offline checkpoint.

Images are seeded synthetic scenes (gradients + rectangles): their token
selections have clear margins, so float rounding differences between vLLM and
transformers cannot flip which tokens are kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_promprune.synthetic import scene_image

from engine import assert_bit_identical, greedy_params, load_reference, run, serving

PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
ENGINE_ARGS = dict(
    enforce_eager=True,
    dtype="float32",
    max_model_len=2048,
    max_num_batched_tokens=1200,  # encoder micro-batch: 1200 // 576 = 2 images
    enable_prefix_caching=True,
    seed=0,
)
NUM_TOKENS = 576
# Scenes whose selections under the settings below are stable to 1e-6 feature noise
# (checked by test_reference_cases_are_well_conditioned).
REFERENCE_SEEDS = (1, 8, 9)
REFERENCE_SETTINGS = [
    {"keep": 64},  # these scenes have Hn ~0.3 < mu: all saliency (CLS attention)
    {"keep": 64, "mu": 0.1},  # Hn > mu: all coverage (DPP)
    {"keep": 16, "order": "selection", "mu": 0.31, "tau": 0.05},  # sigmoid mix
    {"keep": 48, "kr_min": 0.5, "kr_max": 0.5},  # fixed half/half
    {"keep": 32, "mu": 0.1, "coverage": "fps"},
    {"keep": 32, "mu": 0.1, "coverage": "fl"},
    {"keep": 32, "entropy": "attention"},
    {"keep": 32, "fixed_share": 0.25},
    {"keep": 32, "method": "prunesid"},  # CLS + 31 patches
    {"keep": 32, "method": "visionzip"},  # merged tokens
    {"keep": 32, "method": "vispruner"},
    {"keep": 32, "method": "divprune"},
    {"keep": 32, "method": "fps"},
    {"keep": 32, "method": "facility_location"},
    {"keep": 32, "method": "coverage"},
    {"keep": 32, "method": "saliency"},
    {"keep": 32, "method": "random", "seed": 3},
    {"keep": 32, "method": "uniform"},
]


@pytest.fixture(scope="module")
def stock_llm(tiny_llava: Path) -> Iterator[object]:
    from vllm import LLM

    with serving(LLM(str(tiny_llava), **ENGINE_ARGS)) as llm:
        yield llm


@pytest.fixture(scope="module")
def pruned_llm(tiny_llava: Path) -> Iterator[object]:
    from vllm_promprune.offline import PromPruneLLM

    with serving(PromPruneLLM(str(tiny_llava), **ENGINE_ARGS)) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(tiny_llava: Path):  # noqa: ANN201
    from transformers import LlavaForConditionalGeneration

    from vllm_promprune.reference import PrunedLlavaReference

    return load_reference(tiny_llava, LlavaForConditionalGeneration, PrunedLlavaReference)


def _request(image_seed: int, settings: dict | None = None, prompt: str = PROMPT) -> dict:
    request: dict = {"prompt": prompt, "multi_modal_data": {"image": scene_image(image_seed)}}
    if settings is not None:
        request["mm_processor_kwargs"] = {"promprune": settings}
    return request


@pytest.mark.parametrize("settings", [None, {}, {"keep": NUM_TOKENS}, {"keep": 100_000}, {"keep": None, "mu": 0.3}])
def test_keep_all_is_bit_identical_to_stock(stock_llm, pruned_llm, settings: dict | None) -> None:  # noqa: ANN001
    assert_bit_identical(
        stock_llm, pruned_llm, [_request(seed) for seed in (0, 1)], [_request(seed, settings) for seed in (0, 1)]
    )


def test_text_only_prompt_is_unchanged(stock_llm, pruned_llm) -> None:  # noqa: ANN001
    request = {"prompt": "USER: describe a red car ASSISTANT:"}
    assert run(pruned_llm, [request]) == run(stock_llm, [request])


@pytest.mark.parametrize("keep", [1, 16, 64, 575])
def test_prompt_is_text_plus_k(stock_llm, pruned_llm, keep: int) -> None:  # noqa: ANN001
    (stock_ids, _), = run(stock_llm, [_request(3)], max_tokens=1)
    (pruned_ids, _), = run(pruned_llm, [_request(3, {"keep": keep})], max_tokens=1)
    assert len(pruned_ids) == len(stock_ids) - NUM_TOKENS + keep


@pytest.mark.parametrize("settings", REFERENCE_SETTINGS)
def test_matches_transformers_reference(pruned_llm, reference, settings: dict) -> None:  # noqa: ANN001
    seeds = REFERENCE_SEEDS
    results = run(pruned_llm, [_request(seed, settings) for seed in seeds])
    prompt_ids = reference.processor.tokenizer(PROMPT).input_ids
    for seed, (vllm_prompt, vllm_tokens) in zip(seeds, results):
        expected_prompt, expected_tokens = reference.greedy(prompt_ids, [scene_image(seed)], settings, 8)
        assert vllm_prompt == expected_prompt
        assert vllm_tokens == expected_tokens, f"image seed {seed}"


def test_reference_cases_are_well_conditioned(reference) -> None:  # noqa: ANN001
    """Guards the test above: its settings use both PromPrune stages, and every
    selection has margins above float noise (tiny perturbations of the tower
    outputs leave the image embeddings unchanged)."""
    import torch

    from vllm_promprune.methods import PromPruneOptions, saliency_budget, spectral_entropy
    from vllm_promprune.pruning import TowerOutput, prune_images
    from vllm_promprune.settings import parse_settings

    projector = reference.model.model.multi_modal_projector
    generator = torch.Generator().manual_seed(0)

    def jitter(values: torch.Tensor, scale: float) -> torch.Tensor:
        return values + scale * torch.randn(values.shape, generator=generator)

    for seed in REFERENCE_SEEDS:
        tower = reference.tower_output(reference.pixel_values([scene_image(seed)]))
        with torch.inference_mode():
            entropy = spectral_entropy(projector(tower.hidden[0, 1:]))
        assert saliency_budget(entropy, 64, PromPruneOptions()) == 64
        assert saliency_budget(entropy, 64, PromPruneOptions(mu=0.1)) == 0
        assert 0 < saliency_budget(entropy, 16, PromPruneOptions(mu=0.31, tau=0.05)) < 16
        for raw in REFERENCE_SETTINGS:
            settings = [parse_settings(raw)]
            with torch.inference_mode():
                clean = prune_images(tower, settings, projector)[0]
                for _ in range(3):
                    noisy = TowerOutput(jitter(tower.hidden, 1e-6), jitter(tower.saliency, 1e-9), jitter(tower.keys, 1e-6))
                    assert torch.allclose(prune_images(noisy, settings, projector)[0], clean, atol=1e-4), (seed, raw)


def test_budgets_in_one_batch_with_prefix_caching_equal_solo_runs(pruned_llm) -> None:  # noqa: ANN001
    variants = [{"keep": 64}, {"keep": 16}, None, {"keep": 64, "order": "selection"}]
    solo = [run(pruned_llm, [_request(6, settings)])[0] for settings in variants]
    batched = run(pruned_llm, [_request(6, settings) for settings in variants])
    again = run(pruned_llm, [_request(6, settings) for settings in variants])  # prefix-cache hits
    assert batched == solo
    assert again == solo
    assert len({tuple(tokens) for _, tokens in solo}) > 1  # budgets really differ in effect


def test_many_pruned_images_span_encoder_micro_batches(pruned_llm, reference) -> None:  # noqa: ANN001
    from vllm_promprune.models.common import profiled_items_per_batch

    assert profiled_items_per_batch(pruned_llm.llm_engine.vllm_config, NUM_TOKENS) == 2
    seeds = [10, 11, 12, 13, 14]
    results = run(pruned_llm, [_request(seed, {"keep": 16}) for seed in seeds])
    prompt_ids = reference.processor.tokenizer(PROMPT).input_ids
    for seed, result in zip(seeds, results):
        assert result == reference.greedy(prompt_ids, [scene_image(seed)], {"keep": 16}, 8)


@pytest.mark.parametrize(
    ("settings", "field"),
    [({"keep": 0}, "promprune.keep"), ({"keep": 8, "method": "nope"}, "promprune.method"), ({"keep": 8, "tau": -1}, "tau")],
)
def test_bad_settings_raise_and_engine_keeps_serving(pruned_llm, settings: dict, field: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        pruned_llm.generate([_request(0, settings)], greedy_params(), use_tqdm=False)
    (ids, tokens), = run(pruned_llm, [_request(0, {"keep": 8})])
    assert len(tokens) == 8


def test_sampling_params_route_equals_mm_processor_kwargs_route(pruned_llm) -> None:  # noqa: ANN001
    from vllm import SamplingParams

    settings = {"keep": 24, "method": "divprune"}
    via_mm = run(pruned_llm, [_request(2, settings)])
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, extra_args={"promprune": settings})
    via_sampling = pruned_llm.generate([_request(2)], params, use_tqdm=False)
    assert [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in via_sampling] == via_mm
    assert len(via_mm[0][0]) == len(run(pruned_llm, [_request(2, {"keep": 1})], max_tokens=1)[0][0]) + 23
    same = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, extra_args={"promprune": {"keep": 24}})
    assert _run_with(pruned_llm, _request(2, {"keep": 24}), same) == run(pruned_llm, [_request(2, {"keep": 24})])
    clash = SamplingParams(max_tokens=8, extra_args={"promprune": {"keep": 16}})
    with pytest.raises(ValueError, match=r"mm_processor_kwargs\.promprune\.keep=24 but extra_args\.promprune\.keep=16"):
        pruned_llm.generate([_request(2, {"keep": 24})], clash, use_tqdm=False)


def _run_with(llm, request: dict, params) -> list[tuple[list[int], list[int]]]:  # noqa: ANN001
    outputs = llm.generate([request], params, use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]


def test_ratio_budget(stock_llm, pruned_llm) -> None:  # noqa: ANN001
    (stock_ids, _), = run(stock_llm, [_request(3)], max_tokens=1)
    (pruned_ids, _), = run(pruned_llm, [_request(3, {"ratio": 0.25})], max_tokens=1)
    assert len(pruned_ids) == len(stock_ids) - NUM_TOKENS + 144
