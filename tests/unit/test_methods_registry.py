"""Every registered method through the public API: invariants and clear errors."""

from __future__ import annotations

import pytest
import torch

from vllm_promprune.methods import METHODS, merge_tokens, parse_options, select_tokens

N, D, DV, DK = 96, 64, 32, 8
SELECTING = sorted(name for name, spec in METHODS.items() if not spec.merges)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features": torch.randn(N, D, generator=g),
        "saliency": torch.rand(N, generator=g),
        "pre_features": torch.randn(N, DV, generator=g),
        "cls_pre_feature": torch.randn(DV, generator=g),
        "instruction": torch.randn(7, D, generator=g),
    }


@pytest.mark.parametrize("method", SELECTING)
@pytest.mark.parametrize("keep", [1, 9, 64])
def test_selecting_methods_keep_exactly_k_unique_tokens(method: str, keep: int) -> None:
    inputs = _inputs()
    kept = select_tokens(method, keep=keep, **inputs)
    again = select_tokens(method, keep=keep, **{k: v.clone() for k, v in inputs.items()})
    assert kept.shape == (keep,) and kept.dtype == torch.int64
    assert len(set(kept.tolist())) == keep
    assert kept.tolist() == sorted(kept.tolist())
    assert torch.equal(kept, again)
    high = N + int(METHODS[method].with_cls)  # with_cls index space: 0 = CLS, i + 1 = patch i
    assert 0 <= int(kept.min()) and int(kept.max()) < high


def test_prunesid_keeps_cls_first() -> None:
    kept = select_tokens("prunesid", keep=12, order="selection", **_inputs())
    assert int(kept[0]) == 0  # CLS is row 0 of PruneSID's index space


@pytest.mark.parametrize("method", SELECTING)
def test_keep_at_least_n_keeps_every_patch(method: str) -> None:
    kept = select_tokens(method, keep=N, **_inputs())
    assert kept.tolist() == [i + int(METHODS[method].with_cls) for i in range(N)]


def test_visionzip_merges_through_merge_tokens() -> None:
    inputs = _inputs()
    keys = torch.randn(N + 1, DK, generator=torch.Generator().manual_seed(1))
    merged = merge_tokens(
        "visionzip", inputs["pre_features"], 16, cls_pre_feature=inputs["cls_pre_feature"],
        keys=keys, saliency=inputs["saliency"],
    )
    assert merged.shape == (16, DV)
    assert torch.equal(merged[0], inputs["cls_pre_feature"])  # CLS is the first dominant token
    with pytest.raises(ValueError, match="merges tokens"):
        select_tokens("visionzip", keep=16, **inputs)
    with pytest.raises(ValueError, match="selects tokens"):
        merge_tokens(
            "promprune", inputs["pre_features"], 16,
            cls_pre_feature=inputs["cls_pre_feature"], keys=keys, saliency=inputs["saliency"],
        )


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("divprune", {"mu": 0.4}, "mu: unknown option"),
        ("vispruner", {"important_ratio": 2}, "important_ratio"),
        ("random", {"seed": -1}, "seed"),
        ("random", {"seed": 1.5}, "seed"),
        ("visionzip", {"dominant_ratio": 0}, "dominant_ratio"),
        ("prunesid", {"pca": "svd"}, "pca"),
        ("promprune", {"coverage": "kmeans"}, "coverage"),
        ("promprune", {"entropy": "renyi"}, "entropy"),
        ("promprune", {"fixed_share": 1.5}, "fixed_share"),
    ],
)
def test_bad_options_name_the_option(method: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_options(method, options)


def test_missing_inputs_are_named() -> None:
    inputs = _inputs()
    with pytest.raises(ValueError, match="needs pre_features"):
        select_tokens("vispruner", inputs["features"], 8, saliency=inputs["saliency"])
    with pytest.raises(ValueError, match="saliency must start with shape"):
        select_tokens("saliency", inputs["features"], 8, saliency=torch.rand(N + 1))


def test_prunesid_dyn_explains_why_it_is_not_per_image() -> None:
    with pytest.raises(ValueError, match="prunesid_dynamic_budgets"):
        parse_options("prunesid_dyn", {})


def test_random_is_seeded_locally() -> None:
    inputs = _inputs()
    torch.manual_seed(123)
    first = select_tokens("random", keep=10, **inputs)
    torch.manual_seed(456)
    assert torch.equal(first, select_tokens("random", keep=10, **inputs))
    assert not torch.equal(first, select_tokens("random", keep=10, seed=1, **inputs))
