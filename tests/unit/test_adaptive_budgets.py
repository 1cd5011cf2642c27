"""Adaptive budgets without an engine: settings, the budget rule, planning in selection,
and the worker's planned-rows cache."""

from __future__ import annotations

import pytest
import torch

from vllm_promprune.methods.prunesid import redundancy
from vllm_promprune.pruning import PLANNING_PASS, PlanningPass, TowerOutput, image_complexity, prune_images
from vllm_promprune.settings import PruneSettings, parse_image_settings, parse_settings

DYN = {"method": "prunesid_dyn", "keep": 32, "phi_ref": 0.5}


def test_prunesid_dyn_is_prunesid_with_adaptive_phi_budgets() -> None:
    settings = parse_settings(DYN)
    assert (settings.method, settings.keep_mode, settings.complexity, settings.phi_ref) == ("prunesid", "adaptive", "phi", 0.5)
    assert settings.needs_plan and settings.prunes(576)
    with pytest.raises(ValueError, match="only after the planning pass"):
        settings.kept_tokens(576)


def test_the_server_default_carries_the_reference_and_the_method() -> None:
    default = {"method": "promprune", "keep": 64, "phi_ref": 0.3, "mu": 0.4}
    settings = parse_settings({"method": "prunesid_dyn"}, default)
    assert (settings.method, settings.keep, settings.phi_ref, settings.keep_mode) == ("prunesid", 64, 0.3, "adaptive")
    fixed = parse_settings({"keep": 16}, {"method": "prunesid_dyn", "keep": 64, "phi_ref": 0.3})
    assert fixed.needs_plan and fixed.keep == 16  # the request's keep is the average
    assert not parse_settings({"keep": None}, {"method": "prunesid_dyn", "keep": 64, "phi_ref": 0.3}).has_budget


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": "prunesid_dyn", "keep": 32}, r"needs phi_ref, the median phi"),
        ({"keep": 32, "keep_mode": "adaptive", "complexity": "spectral_entropy", "phi_ref": 0.5}, r"needs entropy_ref"),
        ({"method": "prunesid_dyn", "ratio": 0.2, "phi_ref": 0.5}, r"set keep, not ratio"),
        ({**DYN, "keep_mode": "fixed"}, r"promprune\.keep_mode: method 'prunesid_dyn' is 'prunesid'"),
        ({**DYN, "complexity": "spectral_entropy"}, r"promprune\.complexity"),
        ({**DYN, "phi_ref": 0}, r"promprune\.phi_ref"),
        ({**DYN, "phi_ref": float("nan")}, r"promprune\.phi_ref"),
        ({"keep": 8, "keep_mode": "sometimes"}, r"promprune\.keep_mode"),
        ({**DYN, "planned": {"average_keep": 32, "complexity": 0.5, "plan_key": "k"}}, r"promprune\.planned: unknown option"),
    ],
)
def test_bad_adaptive_settings_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_settings(raw)


@pytest.mark.parametrize(
    ("keep", "complexity", "ref", "expected"),
    [
        (32, 0.5, 0.5, 32),
        (32, 0.25, 0.5, 16),
        (64, 0.9, 0.3, 192),
        (10, 0.25, 1.0, 2),  # 2.5 rounds half to even
        (10, 0.35, 1.0, 4),  # 3.5 rounds half to even
        (8, 0.0, 0.5, 1),  # at least one token
        (8, -0.2, 0.5, 1),
        (8, 0.5, 5e-324, 2**31 - 1),  # overflows to inf: the largest budget (clamped to N later)
    ],
)
def test_planned_budget_is_the_rounded_share_of_the_average(keep: int, complexity: float, ref: float, expected: int) -> None:
    settings = parse_settings({"method": "prunesid_dyn", "keep": keep, "phi_ref": ref})
    planned = settings.planned_for(complexity, "key")
    assert planned.keep == expected and not planned.needs_plan
    assert planned.planned is not None and planned.planned.average_keep == keep and planned.planned.complexity == complexity
    assert planned.kept_tokens(expected - 1 if expected > 1 else 1) == (expected - 1 if expected > 1 else 1)  # clamped to N
    with pytest.raises(ValueError, match="only adaptive settings without a planned budget"):
        planned.planned_for(complexity, "key")
    with pytest.raises(ValueError, match="finite"):
        settings.planned_for(float("inf"), "key")


def test_the_planned_budget_is_part_of_the_identity() -> None:
    settings = parse_settings(DYN)
    one, other = settings.planned_for(0.5, "key"), settings.planned_for(0.5000001, "key")
    assert one.keep == other.keep and one.model_dump_json() != other.model_dump_json()
    assert PruneSettings.model_validate_json(one.model_dump_json()) == one


def _tower(num_images: int, seed: int) -> TowerOutput:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_images, 17, 12, generator=generator)
    hidden[1:] = hidden[1:] * 0.2 + hidden[1:, :1]  # a more redundant second image
    return TowerOutput(hidden=hidden, saliency=torch.rand(num_images, 16, generator=generator).softmax(-1),
                       keys=torch.randn(num_images, 17, 4, generator=generator))


def _project(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[..., :8] * 2.0


def test_selection_plans_inside_a_planning_pass_only() -> None:
    tower = _tower(2, 0)
    settings = parse_image_settings({"method": "prunesid_dyn", "keep": 6, "phi_ref": 0.5}, 2)
    with pytest.raises(AssertionError, match="without a planning pass"):
        prune_images(tower, settings, _project)
    planning = PlanningPass("key")
    token = PLANNING_PASS.set(planning)
    try:
        rows = prune_images(tower, settings, _project)
    finally:
        PLANNING_PASS.reset(token)
    phis = [1.0 - float(redundancy(tower.hidden[image, 1:])) for image in range(2)]
    assert [s.planned.complexity for s in planning.planned] == pytest.approx(phis)  # type: ignore[union-attr]
    assert phis[1] < phis[0]
    expected = [min(16, max(1, round(6 * phi / 0.5))) for phi in phis]
    assert [image_rows.shape[0] for image_rows in rows] == expected
    fixed = [parse_settings({"method": "prunesid", "keep": keep}) for keep in expected]
    assert all(torch.equal(a, b) for a, b in zip(rows, prune_images(tower, fixed, _project)))


def test_spectral_entropy_complexity_reads_the_projected_tokens() -> None:
    tower = _tower(1, 1)
    patches = tower.hidden[0, 1:]
    projected = []
    value = image_complexity("spectral_entropy", patches, lambda: projected.append(1) or _project(patches))
    assert projected == [1] and 0.0 < value <= 1.0
    assert image_complexity("phi", patches, lambda: pytest.fail("phi reads no projection")) == pytest.approx(
        1.0 - float(redundancy(patches)))
    assert image_complexity("spectral_entropy", patches[:1], lambda: _project(patches[:1])) == 0.0


def test_planned_rows_are_taken_once_and_bounded_in_bytes() -> None:
    from vllm_promprune.engine.planning import PlannedRows

    cache = PlannedRows(capacity_bytes=2 * 4 * 4 * 8)  # two [4, 8] float32 entries
    settings = parse_settings(DYN)
    planned = [settings.planned_for(0.5 + i / 10, f"key{i}") for i in range(3)]
    rows = [torch.full((4, 8), float(i)) for i in range(3)]
    for entry, entry_rows in zip(planned, rows):
        cache.put(entry, entry_rows)
    assert list(cache.entries) == ["key1", "key2"] and cache.size == 2 * 4 * 4 * 8  # the oldest went
    assert cache.take(planned[0], 4) is None
    assert cache.take(planned[1], 5) is None  # another placeholder count: not these rows
    other = settings.planned_for(0.9, "key2")
    assert cache.take(other, 4) is None  # same image, another budget: never the stale rows
    assert torch.equal(cache.take(planned[2], 4), rows[2])
    assert cache.take(planned[2], 4) is None and list(cache.entries) == ["key1"]
    cache.put(planned[0], torch.zeros(100, 8))  # larger than the whole cache: not kept
    assert list(cache.entries) == ["key1"]
