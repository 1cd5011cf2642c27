"""Selection methods against methods.md on crafted inputs (pure torch, no vLLM)."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_promprune import select_tokens
from vllm_promprune.methods import PromPruneOptions, dpp_greedy_map, saliency_budget, spectral_entropy
from vllm_promprune.methods.promprune import promprune_select


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def concentrated_features(n: int = 96, d: int = 256, seed: int = 0) -> torch.Tensor:
    """Tokens that all lie near two directions: a low-entropy spectrum."""
    g = _generator(seed)
    directions = torch.randn(2, d, generator=g)
    weights = torch.randn(n, 2, generator=g)
    return weights @ directions + 1e-3 * torch.randn(n, d, generator=g)


def spread_features(n: int = 96, d: int = 256, seed: int = 0) -> torch.Tensor:
    """Isotropic Gaussian tokens: a near-flat spectrum."""
    return torch.randn(n, d, generator=_generator(seed))


def test_entropy_orders_concentrated_below_spread() -> None:
    low = spectral_entropy(concentrated_features())
    high = spectral_entropy(spread_features())
    assert 0.0 <= low < 0.3 < 0.8 < high <= 1.0


def test_entropy_uses_smaller_gram_when_tokens_outnumber_width() -> None:
    features = spread_features(n=200, d=16)
    value = spectral_entropy(features)
    # Normalised by ln(min(N, D)) = ln 16: isotropic tokens give close to 1.
    assert 0.9 < value <= 1.0


def test_split_moves_budget_towards_saliency_for_concentrated_features() -> None:
    options = PromPruneOptions()
    keep = 32
    k_sal_concentrated = saliency_budget(spectral_entropy(concentrated_features()), keep, options)
    k_sal_spread = saliency_budget(spectral_entropy(spread_features()), keep, options)
    assert k_sal_concentrated == keep  # Hn far below mu: all saliency
    assert k_sal_spread == 0  # Hn far above mu: all coverage


@pytest.mark.parametrize(("keep", "expected"), [(5, 2), (7, 4), (9, 4), (3, 2), (64, 32)])
def test_saliency_budget_rounds_half_to_even(keep: int, expected: int) -> None:
    options = PromPruneOptions(mu=0.5, tau=0.02)
    # Hn == mu gives sigmoid(0) = 0.5 exactly, so r * K = K / 2.
    assert saliency_budget(torch.tensor(0.5), keep, options) == expected


def test_saliency_budget_respects_share_bounds() -> None:
    options = PromPruneOptions(kr_min=0.1, kr_max=0.7)
    assert saliency_budget(torch.tensor(0.0), 100, options) == 70
    assert saliency_budget(torch.tensor(1.0), 100, options) == 10


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="kr_min"):
        PromPruneOptions(kr_min=0.8, kr_max=0.2)
    with pytest.raises(ValueError, match="unknown_knob"):
        select_tokens("promprune", spread_features(), 8, saliency=torch.rand(96), unknown_knob=1)
    with pytest.raises(ValueError, match="tau"):
        select_tokens("promprune", spread_features(), 8, saliency=torch.rand(96), tau=0)


def _greedy_log_det_reference(features: torch.Tensor, k: int, first: int) -> list[int]:
    """Textbook greedy MAP from a given first item: add the item maximising det(L_S)."""
    y = torch.nn.functional.normalize(features.double(), dim=-1)
    kernel = y @ y.T
    picked: list[int] = [first]
    for _ in range(k - 1):
        best, best_det = -1, -1.0
        for i in range(len(y)):
            if i in picked:
                continue
            subset = picked + [i]
            det = torch.linalg.det(kernel[subset][:, subset]).item()
            if det > best_det + 1e-12:
                best, best_det = i, det
        picked.append(best)
    return picked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpp_matches_textbook_greedy_determinant(seed: int) -> None:
    features = torch.randn(24, 8, generator=_generator(seed))
    picked = dpp_greedy_map(features[None], 6)[0].tolist()
    # First pick: the diagonal is all 1 (up to rounding), ties -> first index.
    assert picked[0] == 0
    assert picked == _greedy_log_det_reference(features, 6, first=0)


def test_dpp_never_repeats_on_rank_deficient_kernel() -> None:
    # Rank 2: after two picks every residual gain is 0.
    features = concentrated_features(n=20, d=16, seed=3)
    features[5] = features[4]  # exact duplicate too
    picked = dpp_greedy_map(features[None], 20)[0]
    assert sorted(picked.tolist()) == list(range(20))


def test_dpp_first_pick_without_stage_one_skips_zero_tokens() -> None:
    features = torch.randn(10, 6, generator=_generator(11))
    features[:3] = 0.0  # zero tokens have a zero kernel diagonal
    assert int(dpp_greedy_map(features[None], 1)[0, 0]) == 3


def test_dpp_first_pick_is_least_covered_token() -> None:
    g = _generator(4)
    candidates = torch.randn(30, 12, generator=g)
    covered = torch.randn(5, 12, generator=g)
    cosine = torch.nn.functional.normalize(candidates, dim=-1) @ torch.nn.functional.normalize(covered, dim=-1).T
    expected = int(cosine.amax(dim=1).argmin())
    selected = torch.arange(35) >= 30
    picked = dpp_greedy_map(torch.cat([candidates, covered])[None], 3, selected=selected[None])[0]
    assert int(picked[0]) == expected
    assert not selected[picked].any()


def test_promprune_stage_one_is_top_saliency_and_stage_two_starts_least_covered() -> None:
    features = spread_features(n=80, d=64, seed=5)
    saliency = torch.rand(80, generator=_generator(6))
    options = PromPruneOptions(kr_min=0.25, kr_max=0.25)  # fixed 25 % saliency share
    picked = promprune_select(features[None], saliency[None], 16, options)[0]
    salient = torch.topk(saliency, 4, largest=True, sorted=False).indices  # the reference's call, its order
    assert picked[:4].tolist() == salient.tolist()
    rest = [i for i in range(80) if i not in salient.tolist()]
    cosine = torch.nn.functional.normalize(features[rest], dim=-1) @ torch.nn.functional.normalize(features[salient], dim=-1).T
    assert int(picked[4]) == rest[int(cosine.amax(dim=1).argmin())]


def test_all_saliency_share_equals_top_k() -> None:
    features = spread_features(n=50, d=32)
    saliency = torch.rand(50, generator=_generator(7))
    kept = select_tokens("promprune", features, 10, saliency=saliency, kr_min=1.0, kr_max=1.0)
    assert kept.tolist() == sorted(torch.topk(saliency, 10).indices.tolist())


@pytest.mark.parametrize(("method", "keep"), list(itertools.product(["promprune", "uniform"], [1, 7, 64, 95])))
def test_exactly_k_unique_sorted_and_deterministic(method: str, keep: int) -> None:
    features = spread_features()
    saliency = torch.rand(96, generator=_generator(8))
    first = select_tokens(method, features, keep, saliency=saliency)
    again = select_tokens(method, features.clone(), keep, saliency=saliency.clone())
    assert first.dtype == torch.int64 and first.shape == (keep,)
    assert len(set(first.tolist())) == keep
    assert first.tolist() == sorted(first.tolist())
    assert torch.equal(first, again)


def test_selection_order_returns_pick_order() -> None:
    features = spread_features()
    saliency = torch.rand(96, generator=_generator(9))
    spatial = select_tokens("promprune", features, 12, saliency=saliency)
    picked = select_tokens("promprune", features, 12, saliency=saliency, order="selection")
    assert sorted(picked.tolist()) == spatial.tolist()
    assert picked.tolist() != spatial.tolist()


@pytest.mark.parametrize("keep", [96, 97, 10_000])
def test_keep_at_least_n_is_identity(keep: int) -> None:
    features = spread_features()
    assert torch.equal(select_tokens("promprune", features, keep, saliency=torch.rand(96)), torch.arange(96))


@pytest.mark.parametrize("keep", [0, -1, 1.5, "64", True, None])
def test_invalid_keep_is_a_clear_error(keep: object) -> None:
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        select_tokens("promprune", spread_features(), keep, saliency=torch.rand(96))  # type: ignore[arg-type]


def test_unknown_method_and_missing_saliency_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        select_tokens("nope", spread_features(), 8)
    with pytest.raises(ValueError, match="needs saliency"):
        select_tokens("promprune", spread_features(), 8)
    with pytest.raises(ValueError, match="order must be one of"):
        select_tokens("uniform", spread_features(), 8, order="random")


def test_uniform_is_evenly_strided() -> None:
    assert select_tokens("uniform", spread_features(), 4).tolist() == [0, 24, 48, 72]


def test_batched_dpp_equals_per_image_runs() -> None:
    features = torch.randn(3, 40, 16, generator=_generator(12))
    selected = torch.zeros(3, 40, dtype=torch.bool)
    selected[1, [3, 7, 9]] = True  # one image with a stage-1 set, two without
    batched = dpp_greedy_map(features, 10, selected=selected)
    for b in range(3):
        assert torch.equal(batched[b], dpp_greedy_map(features[b : b + 1], 10, selected=selected[b : b + 1])[0])


@pytest.mark.parametrize("coverage", ["dpp", "fps", "fl"])
def test_batched_promprune_with_different_splits_equals_per_image_runs(coverage: str) -> None:
    # A concentrated and a spread image in one batch: K_sal = K and K_sal = 0.
    features = torch.stack([concentrated_features(seed=13), spread_features(seed=14)])
    saliency = torch.rand(2, 96, generator=_generator(15))
    options = PromPruneOptions(coverage=coverage)
    batched = promprune_select(features, saliency, 24, options)
    singles = [promprune_select(features[b : b + 1], saliency[b : b + 1], 24, options)[0] for b in range(2)]
    assert [row.tolist() for row in batched] == [row.tolist() for row in singles]
    assert batched[0].tolist() == torch.topk(saliency[0], 24, sorted=False).indices.tolist()  # all saliency


@pytest.mark.parametrize("coverage", ["fps", "fl"])
def test_coverage_stage_ablation_changes_stage_two_only(coverage: str) -> None:
    features = spread_features(seed=16)
    saliency = torch.rand(96, generator=_generator(17))
    base = dict(kr_min=0.5, kr_max=0.5)
    dpp = select_tokens("promprune", features, 20, saliency=saliency, order="selection", **base)
    other = select_tokens("promprune", features, 20, saliency=saliency, order="selection", coverage=coverage, **base)
    assert dpp[:10].tolist() == other[:10].tolist()  # same stage 1
    assert dpp[10:].tolist() != other[10:].tolist()
    assert len(set(other.tolist())) == 20


def test_entropy_proxies() -> None:
    from vllm_promprune.methods.promprune import attention_entropy, feature_norm_entropy

    assert attention_entropy(torch.full((50,), 0.02)).item() == pytest.approx(1.0, abs=1e-6)
    peaked = torch.full((50,), 1e-6)
    peaked[3] = 1.0
    assert attention_entropy(peaked).item() < 0.01
    equal_norms = torch.nn.functional.normalize(spread_features(), dim=-1)
    assert feature_norm_entropy(equal_norms).item() == pytest.approx(1.0, abs=1e-6)
    one_loud = equal_norms.clone()
    one_loud[0] *= 1e6
    assert feature_norm_entropy(one_loud).item() < 0.01
    # The proxy really drives the split: a peaked attention map means low entropy -> saliency.
    kept = select_tokens("promprune", spread_features(), 8, saliency=peaked.repeat(2)[:96], entropy="attention")
    assert 3 in kept.tolist() and len(kept) == 8


def test_fixed_share_ignores_entropy() -> None:
    options = PromPruneOptions(fixed_share=0.25)
    assert saliency_budget(torch.tensor(0.0), 40, options) == 10
    assert saliency_budget(torch.tensor(1.0), 40, options) == 10


@pytest.mark.parametrize("seed", range(6))
def test_renyi_bound_is_below_spectral_entropy(seed: int) -> None:
    from vllm_promprune.methods.promprune import centred_gram, spectral_entropy_lower_bound

    for features in (concentrated_features(seed=seed), spread_features(seed=seed), spread_features(n=300, d=40, seed=seed)):
        gram = centred_gram(features)
        support = min(features.shape)
        assert spectral_entropy_lower_bound(gram, support) <= spectral_entropy(features)


def test_gram_from_cosine_equals_explicit_centring() -> None:
    from vllm_promprune.methods.promprune import centred_gram

    features = spread_features(n=50, d=80)
    unit = torch.nn.functional.normalize(features, dim=-1, eps=1e-8)
    assert torch.allclose(centred_gram(features, unit @ unit.T), centred_gram(features), atol=1e-5)


@pytest.mark.parametrize("mu", [0.1, 0.3, 0.42, 0.6, 0.9])
def test_skipping_the_eigendecomposition_never_changes_the_split(mu: float) -> None:
    from vllm_promprune.methods.promprune import saliency_budgets, stage_one_budgets

    features = torch.stack(
        [
            concentrated_features(seed=20),
            spread_features(seed=21),
            concentrated_features(seed=23) + 0.3 * spread_features(seed=24),
        ]
    )
    saliency = torch.rand(3, 96, generator=_generator(25))
    options = PromPruneOptions(mu=mu)
    exact = saliency_budgets(spectral_entropy(features), 32, options)
    assert torch.equal(stage_one_budgets(features, saliency, 32, options), exact)


@pytest.mark.parametrize("shape", [(1, 600, 64), (3, 1100, 48), (2, 40, 30), (1500, 20)])
def test_blocked_gram_equals_one_product_and_is_symmetric(shape: tuple[int, ...]) -> None:
    from vllm_promprune.methods.common import gram_matrix

    rows = torch.randn(*shape, generator=_generator(30))
    gram = gram_matrix(rows)
    assert gram.shape == (*shape[:-1], shape[-2])
    assert torch.equal(gram, gram.transpose(-1, -2))
    assert torch.allclose(gram, rows @ rows.transpose(-1, -2), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tiny_norm", [None, 1e-7, 0.0])
def test_dpp_kernel_from_shared_cosine_equals_its_own_product(tiny_norm: float | None) -> None:
    from vllm_promprune.methods.common import cosine_matrix
    from vllm_promprune.methods.dpp import dpp_kernel

    features = torch.randn(2, 40, 16, generator=_generator(31))
    if tiny_norm is not None:  # rows below the DPP's 1e-6 norm clamp, above or at the Gram's 1e-8
        features[1, 7] = features[1, 7] / features[1, 7].norm() * tiny_norm
    kernel = dpp_kernel(features, cosine_matrix(features, 1e-8))
    assert torch.allclose(kernel, cosine_matrix(features, 1e-6), atol=1e-6)
    if tiny_norm is None:  # every rescaling factor is exactly 1: the shared product, bit for bit
        assert torch.equal(kernel, cosine_matrix(features, 1e-8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_rows_from_shared_norms_equal_f_normalize_bit_for_bit(dtype: torch.dtype) -> None:
    import torch.nn.functional as F

    from vllm_promprune.methods.common import row_norms, unit_rows

    features = torch.randn(2, 50, 300, generator=_generator(32)).to(dtype)
    features[0, 3] = 0.0
    features[1, 4] *= 1e-9  # below both clamps
    features[1, 5] *= 5e-7 / float(features[1, 5].float().norm())  # between the two clamps
    for eps in (1e-6, 1e-8):
        expected = F.normalize(features.float(), dim=-1, eps=eps)
        assert torch.equal(unit_rows(features, eps, row_norms(features)), expected)
        assert torch.equal(unit_rows(features, eps), expected)
