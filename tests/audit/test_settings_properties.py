"""Whatever the settings validator accepts runs: property-based (hypothesis), pure torch.

The engine validates settings in the processor (a bad request is a 400) and
runs selection later in `embed_multimodal`, where an exception would kill vLLM's
engine core. These tests draw settings the way a client could send them (every
method, budgets 1..N and far beyond, ratios, every option at, near and past its
bounds, per-image lists, both budget modes, a server default), keep those the
validator accepts, and run them through the same helpers the model families
call, on small tensors of each family's real layout. The guard is off
(no `on_failure`), so any exception fails the test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_promprune.families.anyres import anyres_layout, prune_anyres
from vllm_promprune.families.qwen_vision import QWEN_OPTION_DEFAULTS, QWEN_TOWER_INPUTS, QWEN_TOWER_NAME, grid_offsets
from vllm_promprune.methods import METHODS
from vllm_promprune.methods.controls import MAX_SEED
from vllm_promprune.pruning import (
    CLS_TOWER_INPUTS,
    PLANNING_PASS,
    PlanningPass,
    TowerOutput,
    prune_images,
    prune_images_indexed,
)
from vllm_promprune.settings import MAX_KEEP, PruneSettings, parse_image_settings

SIDE = 8  # patches per view side: LLaVA layout at a small scale (CLS + SIDE^2 patches)
NUM_PATCHES = SIDE * SIDE
PRE_WIDTH, WIDTH, KEY_WIDTH = 24, 40, 8
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EVERY_METHOD = pytest.mark.parametrize("method", [*sorted(METHODS), "prunesid_dyn", "nope"])


def _near(low: float, high: float) -> st.SearchStrategy[float]:
    """Floats in [low, high], their bounds, and values just past them (edges drawn most often)."""
    edges = st.sampled_from([low, high, math.nextafter(low, -math.inf), math.nextafter(high, math.inf)])
    return st.one_of(edges, edges, st.floats(low, high), st.floats(allow_nan=True, allow_infinity=True))


OPTION_VALUES: dict[str, st.SearchStrategy[object]] = {
    "mu": _near(0.0, 1.0),
    "tau": st.one_of(_near(1e-6, 1.0), st.sampled_from([1e-7, 1e-300, 0.0, 1e6, 1e300])),
    "kr_min": _near(0.0, 1.0),
    "kr_max": _near(0.0, 1.0),
    "fixed_share": st.one_of(st.none(), _near(0.0, 1.0)),
    "entropy": st.sampled_from(["spectral", "attention", "feature_norm", "nope"]),
    "coverage": st.sampled_from(["dpp", "fps", "fl", "nope"]),
    "pca": st.sampled_from(["exact", "lowrank", "nope"]),
    "important_ratio": _near(0.0, 1.0),
    "dominant_ratio": _near(0.0, 1.0),
    "relevance_sign": st.sampled_from([1, -1, 0, 2, "1", None]),
    "theta": st.one_of(st.none(), _near(0.0, 1.0)),
    "seed": st.one_of(
        st.integers(0, 1000),
        st.sampled_from([-1, MAX_SEED, MAX_SEED + 1, 2**64, 2**80]),
        st.sampled_from([MAX_SEED - 1, MAX_SEED, 2**64 - 1, 2**64, 2**80]),
        st.floats(0, 10),
    ),
}


def _budget(max_tokens: int) -> st.SearchStrategy[object]:
    one_keep = st.one_of(
        st.integers(1, max_tokens + 2),
        st.sampled_from([0, -1, MAX_KEEP, MAX_KEEP + 1, True, 2.0]),
    )
    one_ratio = st.one_of(_near(0.0, 1.0), st.sampled_from([1e-300, 5e-324]))
    return st.one_of(
        st.fixed_dictionaries({"keep": one_keep}),
        st.fixed_dictionaries({"keep": st.integers(1, max_tokens - 1)}),
        st.fixed_dictionaries({"ratio": one_ratio}),
        st.fixed_dictionaries({"keep": st.lists(one_keep, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"ratio": st.lists(one_ratio, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"keep": one_keep, "ratio": one_ratio}),
        st.just({}),
    )


@st.composite
def raw_settings(draw: st.DrawFn, max_tokens: int, method: str) -> dict[str, object]:
    """A `promprune` settings object for `method` as a client could send it."""
    raw: dict[str, object] = dict(draw(_budget(max_tokens)))
    if method != "promprune" or draw(st.booleans()):  # promprune is also the default method
        raw["method"] = method
    accepted = list(METHODS[method].options.model_fields) if method in METHODS else []
    names = draw(st.lists(st.sampled_from(accepted or ["mu"]), unique=True, max_size=4))
    if draw(st.integers(0, 9)) == 0:  # now and then an option of another method
        names.append(draw(st.sampled_from(sorted(OPTION_VALUES))))
    for name in names:
        raw[name] = draw(OPTION_VALUES[name])
    if draw(st.booleans()):
        raw["order"] = draw(st.sampled_from(["spatial", "selection", "nope"]))
    if draw(st.booleans()):
        raw["budget_mode"] = draw(st.sampled_from(["global", "per_crop", "nope"]))
    if draw(st.booleans()):  # adaptive budgets (planned in `_planning`)
        raw["keep_mode"] = draw(st.sampled_from(["adaptive", "adaptive", "fixed", "nope"]))
        for name in draw(st.lists(st.sampled_from(["complexity", "phi_ref", "entropy_ref"]), unique=True)):
            raw[name] = draw(st.sampled_from(["phi", "spectral_entropy", "nope"]) if name == "complexity"
                             else st.one_of(_near(0.0, 2.0), st.sampled_from([1e-300, 1e300])))
    return raw


def _accepted(
    raw: dict[str, object],
    num_images: int,
    default: dict[str, object] | None,
    inputs: frozenset[str] = CLS_TOWER_INPUTS,
    tower_name: str = "the tower",
    option_defaults: dict[str, object] | None = None,
) -> list[PruneSettings] | None:
    """What the processor would accept (None: it answers 400)."""
    try:
        parsed = parse_image_settings(raw, num_images, default, option_defaults)
        for image_settings in parsed:
            image_settings.check_inputs(inputs, tower_name)
    except ValueError:
        return None
    return parsed


@contextmanager
def _planning() -> Iterator[PlanningPass]:
    """The engine's planning pass around a selection: adaptive settings are decided in it."""
    current = PlanningPass("plan key")
    token = PLANNING_PASS.set(current)
    try:
        yield current
    finally:
        PLANNING_PASS.reset(token)


def _planned(parsed: list[PruneSettings], current: PlanningPass) -> list[PruneSettings]:
    """`parsed` with each adaptive image's settings as the planning pass decided them."""
    decided = iter(current.planned)
    planned = [next(decided) if image_settings.needs_plan else image_settings for image_settings in parsed]
    assert next(decided, None) is None
    return planned


def _tower(num_views: int, num_patches: int, generator: torch.Generator, keys: bool = True) -> TowerOutput:
    """Tower outputs of a few clustered directions plus noise (some near-duplicate tokens)."""
    centres = torch.randn(4, PRE_WIDTH, generator=generator)
    assignment = torch.randint(0, 4, (num_views, num_patches + 1), generator=generator)
    hidden = centres[assignment] + 0.3 * torch.randn(num_views, num_patches + 1, PRE_WIDTH, generator=generator)
    saliency = torch.rand(num_views, num_patches, generator=generator).softmax(dim=1)
    key_rows = torch.randn(num_views, num_patches + 1, KEY_WIDTH, generator=generator) if keys else None
    return TowerOutput(hidden=hidden, saliency=saliency, keys=key_rows)


PROJECTOR = torch.nn.Sequential(torch.nn.Linear(PRE_WIDTH, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, WIDTH))


def _project(tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return PROJECTOR(tokens)


INSTRUCTIONS = st.tuples(st.integers(1, 40), st.booleans())
"""(M, all-zero rows): the instruction embeddings an image's request gives (CDPruner); any
prompt with text gives M >= 1 (the processor refuses text-free prompts for CDPruner)."""


def _instructions(parsed: list[PruneSettings], instruction: tuple[int, bool], seed: int) -> list[torch.Tensor | None]:
    length, zero = instruction
    rows = torch.zeros(length, WIDTH) if zero else torch.randn(length, WIDTH, generator=torch.Generator().manual_seed(seed))
    return [rows if image_settings.reads_instruction else None for image_settings in parsed]


DEFAULTS = st.one_of(
    st.none(), st.just({"keep": 16}), st.just({"keep": 16, "mu": 0.3, "method": "promprune"}),
    st.just({"keep": 16, "phi_ref": 0.4, "entropy_ref": 0.6}), st.just({"method": "prunesid_dyn", "keep": 24, "phi_ref": 0.4}),
)


@EVERY_METHOD
@PROPERTY_SETTINGS
@given(data=st.data(), default=DEFAULTS, num_images=st.integers(1, 3), seed=st.integers(0, 2**16),
       instruction=INSTRUCTIONS)
def test_llava_accepts_only_what_runs(
    method: str, data: st.DataObject, default: dict | None, num_images: int, seed: int, instruction: tuple[int, bool]
) -> None:
    raw = data.draw(raw_settings(NUM_PATCHES, method))
    parsed = _accepted(raw, num_images, default)
    if parsed is None:
        return
    tower = _tower(num_images, NUM_PATCHES, torch.Generator().manual_seed(seed))
    with _planning() as current:
        rows = prune_images(tower, parsed, _project, instructions=_instructions(parsed, instruction, seed))
    for image_rows, image_settings in zip(rows, _planned(parsed, current), strict=True):
        assert image_rows.shape == (image_settings.placeholders(NUM_PATCHES, NUM_PATCHES), WIDTH)
        assert torch.isfinite(image_rows).all()


# A small AnyRes geometry with the real structure: views of SIDE x SIDE patches,
# pinpoints of 1x2, 2x1 and 2x2 views, letterboxed (unpadded) images.
VIEW = SIDE * 14
PINPOINTS = [[VIEW, 2 * VIEW], [2 * VIEW, VIEW], [2 * VIEW, 2 * VIEW]]
IMAGE_SIZES = [(2 * VIEW, 2 * VIEW), (VIEW, 2 * VIEW), (3 * VIEW // 2, 2 * VIEW), (2 * VIEW, VIEW - 10)]


@EVERY_METHOD
@PROPERTY_SETTINGS
@given(data=st.data(), default=DEFAULTS, size=st.sampled_from(IMAGE_SIZES), seed=st.integers(0, 2**16),
       instruction=INSTRUCTIONS)
def test_llava_next_accepts_only_what_runs(
    method: str, data: st.DataObject, default: dict | None, size: tuple[int, int], seed: int, instruction: tuple[int, bool]
) -> None:
    raw = data.draw(raw_settings(5 * NUM_PATCHES, method))
    layout = anyres_layout(*size, PINPOINTS, VIEW, 14)
    parsed = _accepted(raw, 1, default)
    if parsed is None or not parsed[0].prunes(layout.num_content):
        return
    tower = _tower(layout.num_views, NUM_PATCHES, torch.Generator().manual_seed(seed))
    (image_instruction,) = _instructions(parsed, instruction, seed)
    with _planning() as current:
        rows = prune_anyres(tower, layout, parsed[0], _project, instruction=image_instruction)
    (planned,) = _planned(parsed, current)
    assert rows.shape == (planned.kept_tokens(layout.num_content), WIDTH)


@EVERY_METHOD
@PROPERTY_SETTINGS
@given(data=st.data(), default=DEFAULTS, grid=st.sampled_from([(1, 1), (1, 2), (3, 5), (8, 8)]), seed=st.integers(0, 2**16),
       instruction=INSTRUCTIONS)
def test_qwen_accepts_only_what_runs(
    method: str, data: st.DataObject, default: dict | None, grid: tuple[int, int], seed: int, instruction: tuple[int, bool]
) -> None:
    raw = data.draw(raw_settings(NUM_PATCHES, method))
    num_tokens = grid[0] * grid[1]
    parsed = _accepted(raw, 1, default, QWEN_TOWER_INPUTS, QWEN_TOWER_NAME, QWEN_OPTION_DEFAULTS)
    if parsed is None or not parsed[0].prunes(num_tokens):
        return
    tower = _tower(1, num_tokens, torch.Generator().manual_seed(seed), keys=False)
    tower = TowerOutput(torch.cat([torch.zeros_like(tower.hidden[:, :1]), tower.hidden[:, 1:]], dim=1), tower.saliency, None)
    with _planning() as current:
        (pruned,) = prune_images_indexed(tower, parsed, _project, instructions=_instructions(parsed, instruction, seed))
    (planned,) = _planned(parsed, current)
    assert pruned.rows.shape == (planned.kept_tokens(num_tokens), WIDTH)
    offsets = grid_offsets(pruned.kept, grid[1])
    assert offsets[:, 1].max() < grid[0] and offsets[:, 2].max() < grid[1]


def test_validator_refuses_what_the_engine_cannot_execute() -> None:
    """The bounds the properties above rely on, each named in the message."""
    cases = [
        ({"keep": 4, "method": "random", "seed": 2**80}, "promprune.seed"),
        ({"keep": 4, "method": "random", "seed": MAX_SEED + 1}, "promprune.seed"),
        ({"keep": 4, "tau": 1e-300}, "promprune.tau"),
        ({"keep": 4, "method": "visionzip", "order": "selection"}, "promprune.order"),
    ]
    for raw, field in cases:
        assert _accepted(raw, 1, None) is None
        try:
            parse_image_settings(raw, 1)
        except ValueError as error:
            assert field in str(error), (raw, str(error))
    assert _accepted({"keep": 4, "method": "random", "seed": MAX_SEED}, 1, None) is not None
