"""Adaptive budgets (PruneSID-Dyn, PromPrune keep_mode "adaptive") in the real vLLM engine:
the planning pass, its cache, identities and failures, on the tiny LLaVA-1.5 checkpoint.

Each served image's budget must be the one the transformers reference's complexity gives
(K_i = max(1, round(keep * c_i / c_ref))), and its rows what the reference keeps with
that fixed budget. The reference cases use textured images whose c_i sit far from a
rounding boundary of keep * c_i / c_ref (asserted: `planned_budget`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_promprune.testing.synthetic import scene_image, textured_image

from .conftest import greedy_params, offline_engine, planned_budget, run, tower_runs

PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nWhich picture has more red? ASSISTANT:"
ENGINE_ARGS = dict(
    enforce_eager=True, dtype="float32", max_model_len=2048, max_num_batched_tokens=1200,
    enable_prefix_caching=True, seed=0,
)
NUM_TOKENS = 576
PHI_REF = 0.4  # textured seeds 1, 10, 11: phi 0.378, 0.239, 0.546 -> K 30, 19, 44 at keep 32
ENTROPY_REF = 0.7
DYN = {"method": "prunesid_dyn", "keep": 32, "phi_ref": PHI_REF}


@pytest.fixture(scope="module")
def llm(tiny_llava: Path) -> Iterator[object]:
    with offline_engine(tiny_llava, ENGINE_ARGS, pruned=True) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(tiny_llava: Path):  # noqa: ANN201
    from vllm_promprune.reference import load_reference

    return load_reference(tiny_llava)


def _request(images: list, settings: dict | None, prompt: str = PROMPT) -> dict:
    request: dict = {"prompt": prompt, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}
    if settings is not None:
        request["mm_processor_kwargs"] = {"promprune": settings}
    return request


def _budget(reference, image, keep: int, signal: str, ref: float) -> int:
    return min(NUM_TOKENS, planned_budget(reference, image, keep, signal, ref))


def _image_rows(llm, request: dict) -> int:
    """Placeholders of the request's one image: prompt length minus the text's."""
    (ids, _), = run(llm, [request], max_tokens=1)
    image_token = llm.llm_engine.model_config.hf_config.image_token_index
    return sum(1 for token in ids if token == image_token)


@pytest.mark.parametrize(
    ("settings", "signal", "ref"),
    [
        (DYN, "phi", PHI_REF),
        ({"keep": 32, "keep_mode": "adaptive", "complexity": "phi", "phi_ref": PHI_REF, "method": "divprune"}, "phi", PHI_REF),
        ({"keep": 40, "keep_mode": "adaptive", "complexity": "spectral_entropy", "entropy_ref": ENTROPY_REF, "mu": 0.1},
         "spectral_entropy", ENTROPY_REF),
    ],
)
def test_budgets_follow_complexity_and_rows_match_the_reference(llm, reference, settings: dict, signal: str, ref: float) -> None:
    images = [textured_image(seed) for seed in (1, 10, 11)]
    results = run(llm, [_request([image], settings) for image in images])
    prompt_ids = reference.processor.tokenizer(PROMPT).input_ids
    method = settings.get("method", "promprune")
    fixed_method = {"method": "prunesid" if method == "prunesid_dyn" else method}
    options = {key: value for key, value in settings.items() if key == "mu"}
    budgets = []
    for image, result in zip(images, results):
        budget = _budget(reference, image, settings["keep"], signal, ref)
        budgets.append(budget)
        assert result == reference.greedy(prompt_ids, [image], {**fixed_method, **options, "keep": budget}, 8)
    if signal == "phi":  # the textured images' spectral entropies are within 0.005 of each other
        assert len(set(budgets)) == 3  # the images really get different budgets


def test_multi_image_prompt_with_per_image_averages(llm, reference) -> None:
    images = [textured_image(10), textured_image(11)]
    settings = {**DYN, "keep": [32, 16]}
    (result,) = run(llm, [_request(images, settings, TWO_IMAGES)])
    budgets = [_budget(reference, image, keep, "phi", PHI_REF) for image, keep in zip(images, (32, 16))]
    prompt_ids = reference.processor.tokenizer(TWO_IMAGES).input_ids
    assert result == reference.greedy(prompt_ids, images, {"method": "prunesid", "keep": budgets}, 8)


def test_sampling_params_route_equals_mm_processor_kwargs_route(llm) -> None:
    from vllm import SamplingParams

    via_mm = run(llm, [_request([scene_image(40)], DYN)])
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, extra_args={"promprune": DYN})
    (output,) = llm.generate([_request([scene_image(40)], None)], params, use_tqdm=False)
    assert [(list(output.prompt_token_ids), list(output.outputs[0].token_ids))] == via_mm


def test_the_server_default_plans_too(tiny_llava: Path, reference) -> None:
    image = textured_image(1)
    with offline_engine(tiny_llava, {**ENGINE_ARGS, "default_settings": DYN}, pruned=True) as engine:
        assert _image_rows(engine, _request([image], None)) == _budget(reference, image, 32, "phi", PHI_REF)
        assert _image_rows(engine, _request([image], {"keep": None})) == NUM_TOKENS  # opting out still works
        # The first image from the processor cache, the second processed: planned budgets follow each.
        other = textured_image(10)
        both = _budget(reference, image, 32, "phi", PHI_REF) + _budget(reference, other, 32, "phi", PHI_REF)
        assert _image_rows(engine, _request([image, other], None, TWO_IMAGES)) == both


def test_the_tower_runs_once_per_planned_image_and_twice_without_the_cache(llm) -> None:
    """Candidate (a) against (b): the planning pass's rows serve the request (one tower run
    per image); with no room in the worker's cache the request encodes the image again."""
    from vllm_promprune.engine import planning

    def set_cache_bytes(capacity: int):  # noqa: ANN202
        def apply(model) -> None:
            planning.PLANNED.capacity_bytes = capacity
        return apply

    default = planning.PLANNED.capacity_bytes
    assert tower_runs(llm, [_request([scene_image(seed)], DYN) for seed in (41, 42)]) == 2
    llm.apply_model(set_cache_bytes(0))
    try:
        assert tower_runs(llm, [_request([scene_image(seed)], DYN) for seed in (43, 44)]) == 4
    finally:
        llm.apply_model(set_cache_bytes(default))


def test_a_planned_image_beside_a_fixed_one_is_not_encoded_again(llm) -> None:
    """One encoder micro-batch with a planned image and a fixed-budget one: the tower runs
    for the planning pass and the fixed image only."""
    requests = [_request([scene_image(48)], DYN), _request([scene_image(49)], {"keep": 16})]
    assert tower_runs(llm, requests) == 2


def test_an_images_identity_includes_its_planned_budget(llm) -> None:
    """The same image planned under another reference gets another budget and identity
    (no stale encoder output); the same settings again are served from the caches with
    no planning pass."""
    from vllm_promprune.engine import planning

    image, settings = scene_image(45), {**DYN, "keep": 300}  # K_i of 187-510: a prompt of full KV blocks
    passes = planning.PLANNING_PASSES._value.get()
    first = _image_rows(llm, _request([image], settings))
    halved = _image_rows(llm, _request([image], {**settings, "phi_ref": 2 * PHI_REF}))
    assert planning.PLANNING_PASSES._value.get() == passes + 2
    assert abs(first - 2 * halved) <= 1 and first != halved
    (output,) = llm.generate([_request([image], settings)], greedy_params(max_tokens=1), use_tqdm=False)
    assert planning.PLANNING_PASSES._value.get() == passes + 2  # complexity remembered
    assert output.num_cached_tokens >= llm.llm_engine.vllm_config.cache_config.block_size  # prefix cache hit


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "prunesid_dyn", "keep": 32}, r"needs phi_ref"),
        ({"keep": 32, "keep_mode": "adaptive", "complexity": "spectral_entropy", "phi_ref": 0.4}, r"needs entropy_ref"),
        ({"method": "prunesid_dyn", "ratio": 0.1, "phi_ref": 0.4}, r"set keep, not ratio"),
        ({"method": "prunesid_dyn", "keep": 32, "phi_ref": 0.4, "keep_mode": "fixed"}, r"promprune\.keep_mode"),
        ({"keep": 32, "planned": {"average_keep": 3, "complexity": 1.0, "plan_key": "x"}}, r"promprune\.planned"),
    ],
)
def test_bad_adaptive_settings_are_refused_and_the_engine_keeps_serving(llm, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([_request([scene_image(0)], settings)], greedy_params(), use_tqdm=False)
    assert _image_rows(llm, _request([scene_image(0)], {"keep": 8})) == 8


def test_a_failed_planning_pass_fails_its_request_only(llm) -> None:
    from vllm_promprune.engine import planning

    def break_planning(model) -> None:
        def refuse(**kwargs: object) -> None:
            raise RuntimeError("tower out of order")
        model.embed_multimodal_before = model.embed_multimodal
        model.embed_multimodal = refuse

    def restore(model) -> None:
        model.embed_multimodal = model.embed_multimodal_before
        del model.embed_multimodal_before

    llm.apply_model(break_planning)
    try:
        with pytest.raises(planning.PlanningUnavailable, match="tower out of order") as raised:
            llm.generate([_request([scene_image(46)], DYN)], greedy_params(), use_tqdm=False)
    finally:
        llm.apply_model(restore)
    assert raised.value.http_status == 503
    assert _image_rows(llm, _request([scene_image(46)], {"keep": 8})) == 8
    assert _image_rows(llm, _request([scene_image(46)], DYN)) >= 1  # planning works again


def test_an_engine_without_the_planning_extension_answers_503_and_keeps_serving(tiny_llava: Path) -> None:
    from vllm_promprune.engine import planning

    with offline_engine(tiny_llava, {**ENGINE_ARGS, "worker_extension_cls": ""}, pruned=True) as engine:
        with pytest.raises(planning.PlanningUnavailable, match="worker_extension_cls") as raised:
            engine.generate([_request([scene_image(47)], DYN)], greedy_params(), use_tqdm=False)
        assert raised.value.http_status == 503
        assert _image_rows(engine, _request([scene_image(47)], {"keep": 8})) == 8
