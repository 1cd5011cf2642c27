"""PruneSID against methods.md on crafted inputs (pure torch, no vLLM)."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_promprune.methods.common import unit_rows
from vllm_promprune.methods.prunesid import (
    PruneSIDOptions,
    _nms_rounds,
    _psca_groups,
    prunesid_dynamic_budgets,
    prunesid_select,
    redundancy,
)

PCA_SOLVERS = ("exact", "lowrank")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_image(num_patches: int = 64, width: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[N + 1, Dv] tokens (CLS first) and [N] saliency."""
    g = _generator(seed)
    tokens = torch.randn(num_patches + 1, width, generator=g)
    saliency = torch.rand(num_patches, generator=g)
    return tokens, saliency


def hadamard(size: int) -> torch.Tensor:
    """Sylvester Hadamard matrix [size, size] of +-1 (size a power of 2)."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def clustered_patches(sizes: list[int], width: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches [sum(sizes), width] in clusters along orthogonal zero-mean +-1 patterns.

    Cluster j repeats 4 * Hadamard row j + 1 (rows 1.. have zero mean), plus 1e-2 noise.
    Cluster sizes differ, so the principal components are not degenerate.
    Returns the patches and the cluster label [N] of each.
    """
    g = _generator(seed)
    patterns = hadamard(width)[1 : len(sizes) + 1]
    labels = torch.cat([torch.full((s,), j) for j, s in enumerate(sizes)])
    patches = 4.0 * patterns[labels] + 1e-2 * torch.randn(len(labels), width, generator=g)
    return patches, labels


def with_cls(patches: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.cat([torch.randn(1, patches.shape[1], generator=_generator(seed)), patches])


# --- output contract -----------------------------------------------------------


@pytest.mark.parametrize("pca", PCA_SOLVERS)
@pytest.mark.parametrize("keep", [2, 3, 9, 17, 40, 64])
def test_returns_n_unique_indices_cls_first(pca: str, keep: int) -> None:
    tokens, saliency = random_image()
    picked = prunesid_select(tokens, saliency, keep, PruneSIDOptions(pca=pca))
    assert picked.dtype == torch.int64
    assert picked.shape == (keep,)
    assert picked[0] == 0
    assert len(set(picked.tolist())) == keep
    assert 1 <= int(picked[1:].min()) and int(picked.max()) <= 64


@pytest.mark.parametrize("pca", PCA_SOLVERS)
def test_deterministic(pca: str) -> None:
    tokens, saliency = random_image(seed=3)
    options = PruneSIDOptions(pca=pca)
    first = prunesid_select(tokens, saliency, 20, options)
    torch.manual_seed(123)  # the global RNG must not matter
    second = prunesid_select(tokens, saliency, 20, options)
    assert torch.equal(first, second)


def test_lowrank_leaves_global_rng_untouched() -> None:
    tokens, saliency = random_image(seed=4)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    prunesid_select(tokens, saliency, 24, PruneSIDOptions(pca="lowrank"))
    assert torch.equal(torch.rand(3), expected)


def test_budget_one_is_cls_only() -> None:
    tokens, saliency = random_image()
    assert prunesid_select(tokens, saliency, 1, PruneSIDOptions()).tolist() == [0]


def test_budget_above_patch_count_keeps_every_row() -> None:
    tokens, saliency = random_image(num_patches=8)
    assert prunesid_select(tokens, saliency, 9, PruneSIDOptions()).tolist() == list(range(9))


@pytest.mark.parametrize("keep", [0, -1, True, 2.0])
def test_invalid_keep_is_rejected(keep: object) -> None:
    tokens, saliency = random_image()
    with pytest.raises(ValueError, match="keep"):
        prunesid_select(tokens, saliency, keep, PruneSIDOptions())  # type: ignore[arg-type]


def test_saliency_shape_must_match_patches() -> None:
    tokens, saliency = random_image()
    with pytest.raises(ValueError, match="saliency"):
        prunesid_select(tokens, saliency[:-1], 5, PruneSIDOptions())


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(ValueError):
        PruneSIDOptions(nms_scale=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        PruneSIDOptions(pca="random")  # type: ignore[arg-type]


# --- quotas --------------------------------------------------------------------


def _quotas(group_sizes: list[int], survivors: list[int], n: int) -> list[int]:
    """`prunesid._quotas` on int64 count tensors, as a list."""
    from vllm_promprune.methods import prunesid

    return prunesid._quotas(torch.tensor(group_sizes), torch.tensor(survivors), n).tolist()


def test_quotas_hand_example() -> None:
    # c = [10, 4, 0, 6], s = [5, 2, 0, 3], n = 9: target n - 1 = 8.
    # lower = [1, 1, 0, 1] (sum 3); bound 5 * ceil(9/64) = 5;
    # upper = [min(5,10,5), min(5,4,2), 0, min(5,6,3)] = [5, 2, 0, 3], sum 10 >= 9: no raise.
    # spare = 8 - 3 = 5, sum(s) = 10; running sums 5, 7, 7, 10 -> 2.5, 3.5, 3.5, 5.0
    # -> rounded (half to even) 2, 4, 4, 5 -> shares [2, 2, 0, 1].
    # + lower = [3, 3, 0, 2]; capped at upper -> [3, 2, 0, 2] (sum 7).
    # Top-up by descending s: group 0 (s = 5) gets the missing 1 -> [4, 2, 0, 2].
    assert _quotas([10, 4, 0, 6], [5, 2, 0, 3], 9) == [4, 2, 0, 2]


def test_quotas_raise_upper_bounds_when_survivors_are_few() -> None:
    # c = [3, 3], s = [1, 1], n = 6: target 5, lower [1, 1], upper [1, 1] (sum 2 < 6)
    # -> raised to [2, 2] (4 < 6) -> [3, 3] (6, stop).
    # spare 3, sum(s) = 2: running 1, 2 -> 1.5, 3.0 -> round 2, 3 -> shares [2, 1]
    # + lower = [3, 2], within upper [3, 3]: total 5.
    assert _quotas([3, 3], [1, 1], 6) == [3, 2]


def test_quotas_top_up_prefers_more_survivors() -> None:
    # c = [8, 8, 8], s = [1, 3, 3], n = 12: target 11, lower [1, 1, 1], bound 5,
    # upper [1, 3, 3] (sum 7 < 12) -> [2, 4, 4] (10) -> [3, 5, 5] (13, stop).
    # spare 8, sum(s) = 7: running 1, 4, 7 -> 8/7, 32/7, 8 -> 1, 5, 8 -> shares [1, 4, 3]
    # + lower = [2, 5, 4], within upper: total 11, no top-up needed.
    assert _quotas([8, 8, 8], [1, 3, 3], 12) == [2, 5, 4]
    # Same but survivors capped harder: c = [2, 9, 9], s = [2, 1, 1], n = 12.
    # upper [2, 1, 1] (4) -> [2, 2, 2] (6) -> [2, 3, 3] (8) -> [2, 4, 4] (10)
    # -> [2, 5, 5] (12, not below n: stop).
    # spare 8, sum(s) = 4: running 2, 3, 4 -> 4, 6, 8 -> shares [4, 2, 2]
    # + lower = [5, 3, 3] -> capped [2, 3, 3] (8); missing 3: group 0 (s=2) is full,
    # then groups 1 and 2 (s=1) in torch.argsort(s, descending=True) order, which for
    # three values is [0, 1, 2]: group 1 fills to 5, group 2 takes the last -> [2, 5, 4].
    assert _quotas([2, 9, 9], [2, 1, 1], 12) == [2, 5, 4]


def test_quotas_top_up_visits_tied_groups_in_argsort_order() -> None:
    # 20 groups (n = 80, q = 20): c = 10 each, s = [20, 3 x 19]. bound 10; upper
    # [10, 3 x 19] (67 < 80) -> [10, 4 x 19] (86). lower 1 each, spare 59, sum(s) = 77.
    # Group 0 asks 1 + 15 but is capped at 10; the others get 1 + 2 or 1 + 3 by the running
    # sum. Deficit 6 -> topped up, one each, to the first six groups below their cap in
    # the order torch.argsort(s, descending=True) gives: among the 19 equal counts that is
    # NOT ascending group index (on this torch: 10, 19, 18, ...; the reference's order).
    counts = [20] + [3] * 19
    quotas = _quotas([10] * 20, counts, 80)
    order = torch.argsort(torch.tensor(counts), descending=True).tolist()
    assert order[1:] != sorted(order[1:])  # the tie order under test is not ascending
    assert quotas == [10, 4, 3, 3, 4, 3, 3, 3, 4, 3, 4, 4, 3, 4, 4, 4, 4, 4, 4, 4]
    # Ascending group index would have topped up groups 2, 3, 5, 6, 7, 9 instead.
    assert sum(quotas) == 79


def test_quotas_running_sum_is_float32_like_the_reference() -> None:
    # c = [20, 20, 20], s = [9, 12, 9], n = 19: target 18, lower [1, 1, 1], spare 15,
    # upper [5, 5, 5] -> [6, 6, 6] -> [7, 7, 7] (21 >= 19).
    # float32 running sums x 15: 4.5, 10.500001, 15.0 -> round 4, 11, 15 -> shares [4, 7, 4]
    # (exact fractions: 4.5, 10.5, 15 -> 4, 10, 15 -> [4, 6, 5], i.e. [5, 7, 6] in the end).
    # + lower = [5, 8, 5] -> capped [5, 7, 5] (17); top-up in argsort order [1, 0, 2]:
    # group 1 is full, group 0 takes the missing one -> [6, 7, 5].
    assert _quotas([20, 20, 20], [9, 12, 9], 19) == [6, 7, 5]


def test_quotas_respect_bounds_and_sum_on_random_inputs() -> None:
    rng = random.Random(0)
    for _ in range(300):
        groups = rng.randint(1, 12)
        sizes = [rng.choice([0, rng.randint(1, 40)]) for _ in range(groups)]
        if sum(sizes) < 2:
            continue
        survivors = [rng.randint(1, c) if c else 0 for c in sizes]
        nonempty = sum(1 for c in sizes if c)
        n = rng.randint(nonempty + 1, sum(sizes) + 1)
        quotas = _quotas(sizes, survivors, n)
        assert sum(quotas) == n - 1
        for c, q in zip(sizes, quotas):
            assert min(1, c) <= q <= c


def test_quotas_edge_cases() -> None:
    assert _quotas([5, 0, 3], [2, 0, 1], 1) == [0, 0, 0]
    # Every group at its cap: the bounds are raised to c and every token is given.
    assert _quotas([2, 3], [1, 1], 6) == [2, 3]
    # A group of c >= n reaches n alone on the first raise that gets there.
    assert _quotas([1, 70], [1, 1], 9) == [1, 7]


@pytest.mark.parametrize("keep", [5, 12, 33])
def test_per_group_counts_follow_the_quotas(keep: int) -> None:
    tokens, saliency = random_image(num_patches=96, width=48, seed=5)
    picked = prunesid_select(tokens, saliency, keep, PruneSIDOptions())
    patches = tokens[1:]
    num_groups = max(keep // 4, 1)
    group = _psca_groups(patches, num_groups, "exact")
    counts = torch.bincount(group[picked[1:] - 1], minlength=num_groups).tolist()
    assert sum(counts) == keep - 1
    sizes = torch.bincount(group, minlength=num_groups).tolist()
    for c, taken in zip(sizes, counts):
        assert min(1, c) <= taken <= c
    # The groups come out in group-index order.
    assert group[picked[1:] - 1].tolist() == sorted(group[picked[1:] - 1].tolist())


# --- NMS -----------------------------------------------------------------------


def _nms_order(
    features: torch.Tensor, group: torch.Tensor, attention: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Pick round per token (N = suppressed) for explicitly given groups."""
    y = unit_rows(features, 1e-8)
    rank = torch.argsort(attention, descending=True, stable=True)
    priority = torch.empty_like(rank).scatter_(0, rank, torch.arange(len(rank), 0, -1))
    num_groups = int(group.max()) + 1
    return _nms_rounds(group, y @ y.T, priority, threshold, num_groups, int(torch.bincount(group).max()))


def test_nms_suppresses_near_duplicate_in_same_group_only() -> None:
    # Token 0 and 1 are near-identical (cosine ~ 0.9999); token 2 is orthogonal.
    features = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    attention = torch.tensor([0.9, 0.8, 0.1, 0.05])
    n = len(features)
    same = _nms_order(features, torch.tensor([0, 0, 0, 1]), attention, 0.5)
    assert same.tolist() == [0, n, 1, 0]  # token 1 suppressed by token 0; token 2 picked second
    apart = _nms_order(features, torch.tensor([0, 1, 0, 1]), attention, 0.5)
    assert apart.tolist() == [0, 0, 1, 1]  # different groups: both duplicates survive


def test_nms_threshold_is_strict_and_scales_with_it() -> None:
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # cosines 0.707, 0, 0.707
    attention = torch.tensor([3.0, 2.0, 1.0])
    group = torch.zeros(3, dtype=torch.long)
    assert _nms_order(features, group, attention, 0.7).tolist() == [0, 3, 1]
    assert _nms_order(features, group, attention, 0.75).tolist() == [0, 1, 2]


def test_suppressed_duplicate_ranks_after_survivors_end_to_end() -> None:
    # n = 3 -> q = 1: every patch is in group 0. Patch 1 duplicates patch 0 and has the
    # second-highest attention; rho = 1/6 (one duplicate pair of 6), thr = 3/32 * 1/6 > 0,
    # so patch 1 is suppressed and the survivor patch 2 is taken instead.
    patches = torch.tensor([[1.0, 0, 0], [1.0, 1e-4, 0], [0, 1.0, 0], [0, 0, 1.0]])
    tokens = with_cls(patches)
    saliency = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert prunesid_select(tokens, saliency, 3, PruneSIDOptions()).tolist() == [0, 1, 3]
    # With the budget of all patches the suppressed one comes last (n = 4 -> q = 1).
    assert prunesid_select(tokens, saliency, 4, PruneSIDOptions()).tolist() == [0, 1, 3, 4]


# --- grouping ------------------------------------------------------------------


@pytest.mark.parametrize("pca", PCA_SOLVERS)
def test_separated_directions_land_in_separate_groups(pca: str) -> None:
    sizes = [3, 5, 8]
    patches, labels = clustered_patches(sizes)
    group = _psca_groups(patches, len(sizes), pca)
    mapping = {int(label): {int(g) for g in group[labels == label]} for label in range(len(sizes))}
    assert all(len(groups) == 1 for groups in mapping.values())  # each cluster in one group
    assert {next(iter(g)) for g in mapping.values()} == set(range(len(sizes)))  # q distinct groups


@pytest.mark.parametrize("pca", PCA_SOLVERS)
def test_opposite_directions_share_a_group_through_absolute_loadings(pca: str) -> None:
    # Clusters +u (5 tokens), -u (3), w (4): the +u/-u tokens are one principal
    # component with loadings of opposite signs; |V| puts them in one group.
    width = 16
    g = _generator(3)
    u, w = hadamard(width)[1], hadamard(width)[2]
    patches = torch.cat([u.expand(5, -1), -u.expand(3, -1), w.expand(4, -1)]) * 4.0
    patches = patches + 1e-2 * torch.randn(12, width, generator=g)
    group = _psca_groups(patches, 2, pca).tolist()
    assert len(set(group[:8])) == 1
    assert set(group[8:]) == {1 - group[0]}


def test_grouping_matches_the_formula_on_random_features() -> None:
    # Independent route: eigenvectors of the Gram matrix of the centred sigmoid
    # matrix (float64) are the right singular vectors of S = sigmoid(H).T [Dv, N].
    features = 2.0 * torch.randn(40, 64, generator=_generator(6))
    q = 5
    samples = torch.sigmoid(features.double()).T
    centred = samples - samples.mean(dim=0, keepdim=True)  # per token, over the features
    vectors = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -q:].flip(1)
    expected = vectors.abs().argmax(dim=1)
    assert torch.equal(_psca_groups(features, q, "exact"), expected)
    assert len(set(expected.tolist())) > 1


@pytest.mark.parametrize("pca", PCA_SOLVERS)
def test_every_cluster_is_represented_end_to_end(pca: str) -> None:
    sizes = [4, 6, 10]
    patches, labels = clustered_patches(sizes, seed=2)
    # The top 11 by attention are cluster 2 (10) and one of cluster 1: cluster 0 would be lost.
    saliency = torch.linspace(0.1, 1.0, len(labels))
    picked = prunesid_select(with_cls(patches), saliency, 12, PruneSIDOptions(pca=pca))  # q = 3
    assert set(labels[picked[1:] - 1].tolist()) == {0, 1, 2}


# --- redundancy ----------------------------------------------------------------


def test_redundancy_identical_tokens_is_one() -> None:
    features = torch.randn(1, 24, generator=_generator(0)).expand(30, -1) * torch.arange(1.0, 31.0)[:, None]
    assert redundancy(features).item() == pytest.approx(1.0, abs=1e-5)


def test_redundancy_orthogonal_tokens_is_zero() -> None:
    assert redundancy(torch.eye(16) * 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_redundancy_matches_pairwise_mean() -> None:
    # e0, e0, e1: pair cosines 1, 0, 0 -> 1/3.
    three = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    assert redundancy(three).item() == pytest.approx(1 / 3, abs=1e-6)
    features = torch.randn(20, 8, generator=_generator(1))
    y = torch.nn.functional.normalize(features, dim=-1)
    cosine = y @ y.T
    i, j = torch.triu_indices(20, 20, offset=1)
    assert redundancy(features).item() == pytest.approx(cosine[i, j].mean().item(), abs=1e-5)
    assert redundancy(features).dtype == torch.float32 and redundancy(features).dim() == 0


# --- PruneSID-Dyn ----------------------------------------------------------------


def _image_with_redundancy(kind: str, num_patches: int = 10) -> torch.Tensor:
    if kind == "orthogonal":  # rho = 0
        return torch.eye(num_patches)
    if kind == "pairs":  # e0, e0, e1, e1, ...: rho = (N/2) / (N (N-1) / 2) = 1 / (N - 1)
        return torch.eye(num_patches)[torch.arange(num_patches) // 2]
    return torch.ones(num_patches, num_patches)  # identical: rho = 1


def test_dynamic_budgets_hand_example() -> None:
    # phi = [1, 1 - 1/9 = 8/9, ~0 (floored to 1e-6)], caps 10, total 4 * 3 = 12.
    # lam + 8 lam / 9 + 1 = 12 -> lam = 99/17 -> shares [5.82, 5.18, 1]
    # -> floors [5, 5, 1] (11); the missing unit goes to the largest remainder (image 0).
    images = [_image_with_redundancy(k) for k in ("orthogonal", "pairs", "identical")]
    assert prunesid_dynamic_budgets(images, 4) == [6, 5, 1]


def test_dynamic_budgets_properties() -> None:
    g = _generator(0)
    base = torch.randn(1, 32, generator=g)
    images = []
    for mix, num_patches in [(0.0, 50), (0.5, 40), (0.8, 60), (0.95, 30)]:
        noise = torch.randn(num_patches, 32, generator=g)
        images.append(mix * base + (1 - mix) * noise)
    rho = [float(redundancy(f)) for f in images]
    assert rho == sorted(rho)  # redundancy grows along the list
    budgets = prunesid_dynamic_budgets(images, 16)
    assert sum(budgets) == 16 * len(images)
    assert budgets == sorted(budgets, reverse=True)  # more redundant -> smaller budget
    assert budgets[0] > budgets[-1]
    assert all(1 <= b <= f.shape[0] for b, f in zip(budgets, images))


def test_dynamic_budgets_respect_caps_and_redistribute() -> None:
    # The least redundant image has only 3 patches: it is capped and the rest moves on.
    images = [torch.eye(3), _image_with_redundancy("orthogonal", 20), _image_with_redundancy("pairs", 20)]
    budgets = prunesid_dynamic_budgets(images, 8)
    assert budgets[0] == 3
    assert sum(budgets) == 24
    assert budgets[1] >= budgets[2]
    # A mean above what the caps allow gives every image all its patches.
    assert prunesid_dynamic_budgets(images, 100) == [3, 20, 20]


def test_dynamic_budgets_equal_redundancy_split_evenly() -> None:
    images = [torch.eye(12)] * 4
    assert prunesid_dynamic_budgets(images, 5) == [5, 5, 5, 5]
    assert prunesid_dynamic_budgets([], 5) == []
    with pytest.raises(ValueError, match="keep"):
        prunesid_dynamic_budgets(images, 0)


def test_distinct_patch_beats_high_attention_copies() -> None:
    # 31 near-copies of e0 (most pairs are duplicates, rho ~ 0.94) with the highest
    # attention, then e1 last. n = 3 -> q = 1, thr = 3/32 * rho ~ 0.09: the first copy
    # suppresses all the others, so the second token kept is e1 (row 32), not a copy.
    offsets = 1e-3 * torch.arange(31.0)[:, None] * torch.tensor([0.0, 1.0])
    patches = torch.cat([torch.tensor([[1.0, 0.0]]) + offsets, torch.tensor([[0.0, 1.0]])])
    saliency = torch.linspace(1.0, 0.0, 32)
    assert redundancy(patches).item() > 0.9
    assert prunesid_select(with_cls(patches), saliency, 3, PruneSIDOptions()).tolist() == [0, 1, 32]
