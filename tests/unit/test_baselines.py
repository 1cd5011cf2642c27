"""Baseline selectors (DivPrune, VisPruner, FPS, facility location, controls) on crafted inputs."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from pydantic import ValidationError

from vllm_promprune.methods.controls import RandomOptions, random_tokens, top_saliency, uniform
from vllm_promprune.methods.divprune import divprune
from vllm_promprune.methods.facility_location import facility_location
from vllm_promprune.methods.fps import farthest_point_sampling
from vllm_promprune.methods.vispruner import VisPrunerOptions, drop_schedule, vispruner
from vllm_promprune.testing.stepwise import vispruner_stepwise


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(seed: int = 0, batch: int = 3, n: int = 40, d: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random features [B, N, D], saliency [B, N] and a selection mask [B, N].

    Image 0 has no selected tokens, the others have 3 and 7, so batched calls
    mix images with and without an earlier stage.
    """
    g = _generator(seed)
    features = torch.randn(batch, n, d, generator=g)
    saliency = torch.rand(batch, n, generator=g)
    selected = torch.zeros(batch, n, dtype=torch.bool)
    for image, count in zip(range(1, batch), (3, 7)):
        selected[image, torch.randperm(n, generator=g)[:count]] = True
    return features, saliency, selected


Selector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

SELECTORS: dict[str, Selector] = {
    "fps": lambda f, s, sel, k: farthest_point_sampling(f, k),
    "fps_selected": lambda f, s, sel, k: farthest_point_sampling(f, k, selected=sel),
    "facility_location": lambda f, s, sel, k: facility_location(f, k),
    "facility_location_selected": lambda f, s, sel, k: facility_location(f, k, selected=sel),
    "divprune": lambda f, s, sel, k: divprune(f, k),
    "vispruner": lambda f, s, sel, k: vispruner(f, s, k, VisPrunerOptions()),
    "vispruner_ratio_0.3": lambda f, s, sel, k: vispruner(f, s, k, VisPrunerOptions(important_ratio=0.3)),
    "top_saliency": lambda f, s, sel, k: top_saliency(s, k),
}


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize("k", [1, 12, 33])
def test_exactly_k_unique_indices(name: str, k: int) -> None:
    features, saliency, selected = _batch()
    picked = SELECTORS[name](features, saliency, selected, k)
    assert picked.dtype == torch.int64
    assert picked.shape == (3, k)
    for image in range(3):
        row = picked[image].tolist()
        assert len(set(row)) == k
        assert all(0 <= index < 40 for index in row)
        if name.endswith("_selected"):
            assert not selected[image, picked[image]].any()


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_deterministic(name: str) -> None:
    first = SELECTORS[name](*_batch(), 12)
    second = SELECTORS[name](*_batch(), 12)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_batch_equals_per_image(name: str) -> None:
    features, saliency, selected = _batch(seed=3)
    together = SELECTORS[name](features, saliency, selected, 12)
    for image in range(3):
        one = slice(image, image + 1)
        alone = SELECTORS[name](features[one], saliency[one], selected[one], 12)
        assert torch.equal(together[one], alone), f"image {image}"


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_low_precision_inputs_use_float32_math(name: str) -> None:
    features, saliency, selected = _batch(seed=4)
    features, saliency = features.bfloat16(), saliency.bfloat16()
    low = SELECTORS[name](features, saliency, selected, 12)
    high = SELECTORS[name](features.float(), saliency.float(), selected, 12)
    assert torch.equal(low, high)


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_k_zero_and_out_of_range(name: str) -> None:
    features, saliency, selected = _batch()
    assert SELECTORS[name](features, saliency, selected, 0).shape == (3, 0)
    with pytest.raises(ValueError, match="k must be"):
        SELECTORS[name](features, saliency, selected, 41)


# ---- brute-force references (float64, plain Python) ----


def _cosine64(features: torch.Tensor) -> list[list[float]]:
    y = features.double()
    y = y / y.norm(dim=1, keepdim=True)
    return (y @ y.T).tolist()


def _argmax(values: dict[int, float]) -> int:
    best = max(values.values())
    return min(index for index, value in values.items() if value == best)


def _reference_max_min(sim: list[list[float]], first: int, k: int, selected: list[int]) -> list[int]:
    chosen = list(selected)
    picks = [first]
    chosen.append(first)
    while len(picks) < k:
        candidates = {
            i: min(1.0 - sim[i][j] for j in chosen) for i in range(len(sim)) if i not in chosen
        }
        picks.append(_argmax(candidates))
        chosen.append(picks[-1])
    return picks


def _reference_fps(features: torch.Tensor, k: int, selected: list[int]) -> list[int]:
    sim = _cosine64(features)
    first = 0
    if selected:
        first = _argmax({
            i: min(1.0 - sim[i][j] for j in selected) for i in range(len(sim)) if i not in selected
        })
    return _reference_max_min(sim, first, k, selected)


def _reference_divprune(features: torch.Tensor, k: int) -> list[int]:
    sim = _cosine64(features)
    n = len(sim)
    first = _argmax({i: min(1.0 - sim[i][j] for j in range(n) if j != i) for i in range(n)})
    return _reference_max_min(sim, first, k, [])


def _facility_gains(sim: list[list[float]], chosen: list[int], floor: float) -> dict[int, float]:
    """Marginal gain F(chosen + [j]) - F(chosen) of every unchosen j, by brute force."""
    n = len(sim)

    def value(members: list[int]) -> float:
        return sum(max([floor] + [sim[i][j] for j in members]) for i in range(n))

    base = value(chosen)
    return {j: value(chosen + [j]) - base for j in range(n) if j not in chosen}


def _clustered_with_outlier(n: int = 20, d: int = 8, outlier: int = 13) -> torch.Tensor:
    """Tokens near direction e0, except token `outlier`, which points along e1."""
    features = torch.zeros(n, d)
    features[:, 0] = 1.0
    features[:, 2:] = 0.05 * torch.randn(n, d - 2, generator=_generator(1))
    features[outlier] = 0.0
    features[outlier, 1] = 1.0
    return features


# ---- DivPrune ----


def test_divprune_first_pick_is_the_isolated_outlier() -> None:
    picked = divprune(_clustered_with_outlier()[None], 5)
    assert picked[0, 0].item() == 13


def test_divprune_matches_brute_force_greedy() -> None:
    for seed in range(4):
        features = torch.randn(9, 4, generator=_generator(seed))
        assert divprune(features[None], 6)[0].tolist() == _reference_divprune(features, 6)


# ---- FPS ----


def test_fps_starts_at_index_zero_and_reaches_the_outlier_next() -> None:
    picked = farthest_point_sampling(_clustered_with_outlier()[None], 5)[0].tolist()
    assert picked[:2] == [0, 13]


def test_fps_with_an_empty_selection_equals_no_selection() -> None:
    features, _, _ = _batch()
    none = torch.zeros(3, 40, dtype=torch.bool)
    assert torch.equal(
        farthest_point_sampling(features, 10, selected=none), farthest_point_sampling(features, 10)
    )


def test_fps_with_selection_starts_farthest_from_it_and_never_returns_it() -> None:
    for seed in range(3):
        features = torch.randn(12, 5, generator=_generator(seed))
        selected_positions = [2, 7, 9]
        selected = torch.zeros(1, 12, dtype=torch.bool)
        selected[0, selected_positions] = True
        picked = farthest_point_sampling(features[None], 9, selected=selected)[0].tolist()
        assert picked == _reference_fps(features, 9, selected_positions)
        # k = all unselected tokens: exactly the complement of the selection.
        assert sorted(picked) == [i for i in range(12) if i not in selected_positions]


def test_fps_matches_brute_force_without_selection() -> None:
    features = torch.randn(10, 4, generator=_generator(5))
    assert farthest_point_sampling(features[None], 7)[0].tolist() == _reference_fps(features, 7, [])


# ---- facility location ----


def test_facility_location_first_pick_maximises_coverage() -> None:
    for seed in range(4):
        features = torch.randn(15, 3, generator=_generator(seed))
        sim = _cosine64(features)
        coverage = {j: sum(max(0.0, sim[i][j]) for i in range(15)) for j in range(15)}
        assert facility_location(features[None], 1)[0, 0].item() == _argmax(coverage)


def test_facility_location_ignores_negative_similarity_for_the_empty_set() -> None:
    e0, e1, e2 = torch.eye(3)
    features = torch.stack([e1, -e0, -e0, -e0, e0, 0.8 * e1 + 0.6 * e2])
    # Step 2: token 0 gains 1 + 0.8; token 4 gains 1, but 2 if its coverage after
    # picking -e0 were the negative similarity -1 instead of 0.
    assert facility_location(features[None], 3)[0].tolist() == [1, 0, 4]


@pytest.mark.parametrize("width", [3, 8])
@pytest.mark.parametrize("selected_positions", [[], [1, 4], [0, 3, 6, 10]])
def test_facility_location_matches_brute_force_greedy(width: int, selected_positions: list[int]) -> None:
    # Exact ties are common: two tokens that mostly cover each other have equal
    # gains in exact arithmetic, and float32 rounding may break them either way.
    # Where the float64 best gain leads by more than 1e-6 the pick must be it;
    # otherwise it must be one of the tied candidates. The rest stays on the
    # brute-force greedy path because the implementation's own picks are replayed.
    selected = torch.zeros(1, 11, dtype=torch.bool)
    selected[0, selected_positions] = True
    floor = -math.inf if selected_positions else 0.0
    for seed in range(6):
        features = torch.randn(11, width, generator=_generator(seed))
        sim = _cosine64(features)
        picked = facility_location(features[None], 11 - len(selected_positions), selected=selected)
        chosen = list(selected_positions)
        for pick in picked[0].tolist():
            gains = _facility_gains(sim, chosen, floor)
            best = max(gains.values())
            tied = [j for j, gain in gains.items() if gain >= best - 1e-6]
            assert pick in tied, f"seed {seed}: picked {pick}, best {tied} after {chosen}"
            chosen.append(pick)


# ---- VisPruner ----


def _reference_vispruner(pre: torch.Tensor, saliency: torch.Tensor, k: int, ratio: float) -> list[int]:
    """Float64 VisPruner for continuous inputs (no exact ties, so any descending sort agrees;
    ties are tested below and in tests/audit)."""
    n = len(saliency)
    k_important = int(k * ratio)
    k_diverse = k - k_important
    by_saliency = sorted(range(n), key=lambda i: (-saliency[i].item(), i))
    residual = by_saliency[k_important:]  # a list in saliency order
    sim = _cosine64(pre)
    while len(residual) > k_diverse:
        evens, odds = residual[0::2], residual[1::2]
        drop = min(8, len(residual) - k_diverse, len(evens))
        scores = [max(sim[e][o] for o in odds) for e in evens]
        ranked = sorted(range(len(evens)), key=lambda s: (-scores[s], s))
        residual = [evens[s] for s in ranked[drop:]] + odds
    return by_saliency[:k_important] + residual


def test_vispruner_keeps_the_top_saliency_tokens_first() -> None:
    features, saliency, _ = _batch(seed=6)
    saliency[0, 5] = saliency[0, 9] = 2.0  # a tie: in the order the reference's argsort gives
    picked = vispruner(features, saliency, 16, VisPrunerOptions())
    assert sorted(picked[0, :2].tolist()) == [5, 9]
    order = saliency.argsort(dim=-1, descending=True)
    for image in range(3):
        assert picked[image, :8].tolist() == order[image, :8].tolist()
        assert not set(picked[image, 8:].tolist()) & set(order[image, :8].tolist())


def _tied_images(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, N // 12] tokens on N // 12 scaled basis directions (cosines exactly 0 or 1) and
    [B, N] saliency with 3 values: exact ties in both of VisPruner's rankings."""
    g = _generator(seed)
    directions = torch.randint(n // 12, (batch, n), generator=g)
    scale = 1.0 + torch.rand(batch, n, 1, generator=g)
    pre = torch.nn.functional.one_hot(directions, n // 12).float() * scale
    saliency = torch.randint(3, (batch, n), generator=g).float() / 3
    return pre, saliency


@pytest.mark.parametrize(("n", "k"), [(96, 24), (576, 64), (2880, 2560)])  # 2880: the length, few rounds
def test_vispruner_batched_equals_per_image_with_exact_ties(n: int, k: int) -> None:
    """Batched == one image at a time where the unstable argsort meets exact ties."""
    batch = 5 if n < 2880 else 2
    pre, saliency = _tied_images(batch, n, seed=n)
    options = VisPrunerOptions()
    together = vispruner(pre, saliency, k, options)
    for image in range(batch):
        alone = vispruner(pre[image : image + 1], saliency[image : image + 1], k, options)
        assert torch.equal(together[image], alone[0]), f"image {image}"
    other = [batch - 1, 0]  # another batch size and order
    assert torch.equal(vispruner(pre[other], saliency[other], k, options), together[other])
    # The ties decide tokens: with a stable sort some image keeps other tokens.
    assert any(
        set(together[image].tolist()) != set(vispruner_stepwise(pre[image], saliency[image], k, ranking="stable"))
        for image in range(batch)
    )


def test_vispruner_removes_exact_duplicates() -> None:
    # Positions 20..23 are the important tokens; 0..19 are ten pairs of identical tokens.
    distinct = torch.randn(10, 64, generator=_generator(7))
    pre = torch.cat([distinct.repeat_interleave(2, dim=0), torch.randn(4, 64, generator=_generator(8))])
    saliency = torch.zeros(24)
    saliency[20:] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    picked = vispruner(pre[None], saliency[None], 8, VisPrunerOptions())[0].tolist()
    assert picked[:4] == [20, 21, 22, 23]
    pairs = [index // 2 for index in picked[4:]]
    assert len(set(pairs)) == 4, f"kept two copies of one token: {picked[4:]}"


@pytest.mark.parametrize(
    ("n", "k", "ratio"),
    [(40, 12, 0.5), (40, 2, 0.5), (10, 2, 0.5), (40, 7, 0.0), (57, 20, 0.3), (40, 39, 0.5)],
)
def test_vispruner_matches_literal_reference(n: int, k: int, ratio: float) -> None:
    for seed in range(2):
        g = _generator(seed)
        pre = torch.randn(n, 32, generator=g)
        saliency = torch.rand(n, generator=g)
        picked = vispruner(pre[None], saliency[None], k, VisPrunerOptions(important_ratio=ratio))
        assert picked[0].tolist() == _reference_vispruner(pre, saliency, k, ratio)


def test_vispruner_drop_schedule() -> None:
    assert drop_schedule(544, 32) == [8] * 64
    assert drop_schedule(20, 7) == [8, 5]
    # Nine tokens to one: rounds are capped by the number of even slots.
    assert drop_schedule(9, 1) == [5, 2, 1]
    assert drop_schedule(5, 5) == []


def test_vispruner_all_important_when_ratio_is_one() -> None:
    features, saliency, _ = _batch()
    picked = vispruner(features, saliency, 10, VisPrunerOptions(important_ratio=1.0))
    assert torch.equal(picked, saliency.argsort(dim=-1, descending=True)[:, :10])


def test_vispruner_options_validation() -> None:
    assert VisPrunerOptions().important_ratio == 0.5
    with pytest.raises(ValidationError):
        VisPrunerOptions(important_ratio=1.5)
    with pytest.raises(ValidationError):
        VisPrunerOptions(ratio=0.5)


# ---- controls ----


def test_uniform_is_evenly_strided() -> None:
    assert uniform(10, 4).tolist() == [0, 2, 5, 7]
    assert uniform(576, 64).tolist() == list(range(0, 576, 9))
    assert uniform(7, 7).tolist() == list(range(7))
    assert uniform(10, 4).dtype == torch.int64


def test_random_tokens_are_seeded() -> None:
    first = random_tokens(576, 64, 0, "cpu")
    assert first.dtype == torch.int64 and first.shape == (64,)
    assert len(set(first.tolist())) == 64 and 0 <= first.min() and first.max() < 576
    assert torch.equal(first, random_tokens(576, 64, 0, "cpu"))
    assert not torch.equal(first, random_tokens(576, 64, 1, "cpu"))
    torch.manual_seed(123)  # the global RNG has no influence
    assert torch.equal(first, random_tokens(576, 64, 0, "cpu"))
    assert sorted(random_tokens(9, 9, 3).tolist()) == list(range(9))


def test_top_saliency_breaks_ties_towards_lower_index() -> None:
    saliency = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.9]])
    assert top_saliency(saliency, 2).tolist() == [[1, 2], [2, 3]]
    assert top_saliency(saliency, 3).tolist() == [[1, 2, 3], [2, 3, 0]]


def test_random_options_validation() -> None:
    assert RandomOptions().seed == 0
    assert RandomOptions(seed=5).seed == 5
    for bad in ({"seed": -1}, {"seed": 1.5}, {"seed": "3"}, {"seed": True}, {"rng": 1}):
        with pytest.raises(ValidationError):
            RandomOptions(**bad)


def test_controls_reject_out_of_range_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        uniform(10, 11)
    with pytest.raises(ValueError, match="k must be"):
        random_tokens(10, -1, 0)
