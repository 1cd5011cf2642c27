"""VisionZip merge against methods.md on crafted inputs (pure torch, no vLLM)."""

from __future__ import annotations

import pytest
import torch

from vllm_promprune.methods.visionzip import VisionZipOptions, _dominant_budget, _plan, visionzip_merge

DEFAULT = VisionZipOptions()
HALF = VisionZipOptions(dominant_ratio=0.5)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_inputs(
    batch: int = 2, n: int = 40, dv: int = 16, dk: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _generator(seed)
    tokens = torch.randn(batch, n + 1, dv, generator=g)
    keys = torch.randn(batch, n + 1, dk, generator=g)
    saliency = torch.rand(batch, n, generator=g)
    return tokens, keys, saliency


def naive_visionzip(
    tokens: torch.Tensor, keys: torch.Tensor, saliency: torch.Tensor, k_dom: int, k_ctx: int
) -> torch.Tensor:
    """One image, loops and float64: tokens [N+1, Dv], keys [N+1, Dk], saliency [N]."""
    n = saliency.shape[0]
    ranked = sorted(range(n), key=lambda i: (-float(saliency[i]), i))
    dominant = [0] + sorted(i + 1 for i in ranked[: k_dom - 1])
    remaining = sorted(i + 1 for i in ranked[k_dom - 1 :])
    step = max(1, len(remaining) // k_ctx) if k_ctx else 1
    targets = [remaining[i * step] for i in range(k_ctx)]
    members: dict[int, list[int]] = {t: [] for t in targets}
    unit = torch.nn.functional.normalize(keys.double(), dim=-1)
    for row in remaining:
        if row in members or not targets:
            continue
        cosines = [float(unit[row] @ unit[t]) for t in targets]
        members[targets[cosines.index(max(cosines))]].append(row)
    rows = [tokens[i].double() for i in dominant]
    for t in targets:
        merged = tokens[members[t]].double().mean(dim=0) if members[t] else 0.0
        rows.append(tokens[t].double() + merged)
    return torch.stack(rows)


def crafted_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N = 12 patches, k = 4 with ratio 0.5: CLS + patch 0 dominant, 2 contextual.

    Remaining rows 2..12 (R = 11); targets at list slots i * (11 // 2) = 0, 5,
    i.e. rows 2 and 7. Keys: rows 3, 4, 11 point like row 2 (e1); the others
    like row 7 (e2).
    """
    n, dv = 12, 6
    tokens = torch.randn(1, n + 1, dv, generator=_generator(21))
    saliency = torch.linspace(1.0, 0.0, n)[None]  # patch 0 (row 1) is the most salient
    e1, e2 = torch.eye(2)
    keys = e2.repeat(1, n + 1, 1)
    keys[0, [2, 3, 4, 11]] = e1 * torch.tensor([[1.0], [2.0], [0.5], [3.0]])  # scale must not matter
    keys[0, 0] = e1  # CLS and the dominant row are never merged, whatever their keys
    keys[0, 1] = e1
    return tokens, keys, saliency


def test_output_shape_and_dtype() -> None:
    tokens, keys, saliency = random_inputs(batch=3, n=40, dv=16)
    out = visionzip_merge(tokens, keys, saliency, 9, DEFAULT)
    assert out.shape == (3, 9, 16) and out.dtype == torch.float32
    out16 = visionzip_merge(tokens.bfloat16(), keys.bfloat16(), saliency, 9, DEFAULT)
    assert out16.shape == (3, 9, 16) and out16.dtype == torch.bfloat16


@pytest.mark.parametrize(("k", "expected"), [(64, 54), (128, 108), (192, 162)])
def test_dominant_budget_matches_published_splits(k: int, expected: int) -> None:
    assert _dominant_budget(k, DEFAULT) == expected
    tokens, keys, saliency = random_inputs(batch=1, n=576, dv=4, dk=4, seed=k)
    plan = _plan(keys, saliency, k, DEFAULT)
    assert plan.dominant.shape == (1, expected) and plan.targets.shape == (1, k - expected)


@pytest.mark.parametrize(
    ("k", "ratio", "expected"), [(5, 0.5, 2), (7, 0.5, 4), (10, 0.01, 1), (9, 1.0, 9), (1, 0.5, 1)]
)
def test_dominant_budget_rounds_half_to_even_and_clamps(k: int, ratio: float, expected: int) -> None:
    assert _dominant_budget(k, VisionZipOptions(dominant_ratio=ratio)) == expected


def test_dominant_rows_are_cls_and_top_saliency_copied_unchanged() -> None:
    tokens, keys, saliency = random_inputs(batch=2, n=50, seed=1)
    k = 20
    k_dom = _dominant_budget(k, DEFAULT)  # round(16.875) = 17
    assert k_dom == 17
    out = visionzip_merge(tokens, keys, saliency, k, DEFAULT)
    for b in range(2):
        top = torch.topk(saliency[b], k_dom - 1).indices + 1
        rows = [0] + sorted(top.tolist())
        assert torch.equal(out[b, :k_dom], tokens[b, rows])


def test_saliency_ties_go_where_topk_puts_them() -> None:
    tokens, keys, _ = random_inputs(batch=1, n=10, seed=2)
    saliency = torch.tensor([[0.1, 0.5, 0.9, 0.5, 0.5, 0.0, 0.9, 0.2, 0.5, 0.3]])
    plan = _plan(keys, saliency, 6, VisionZipOptions(dominant_ratio=5 / 6))  # K_dom = 5, K_ctx = 1
    # Top 4 patches: 2, 6 (0.9), then two of the four 0.5s (1, 3, 4, 8): the two the
    # reference's topk(4, dim=1) returns, which here are not the two lowest indices.
    top = torch.topk(saliency, 4, dim=1).indices[0].tolist()
    assert {2, 6} <= set(top) and set(top) != {1, 2, 3, 6}
    assert plan.dominant.tolist() == [[0, *sorted(patch + 1 for patch in top)]]
    remaining = [row for row in range(1, 11) if row - 1 not in top]
    assert plan.targets.tolist() == [remaining[:1]]  # R = 6, step 6: slot 0
    assert plan.merged.tolist() == [remaining[1:]]


def test_targets_follow_the_reference_stride() -> None:
    tokens, keys, saliency = crafted_case()
    plan = _plan(keys, saliency, 4, HALF)
    assert plan.dominant.tolist() == [[0, 1]]
    assert plan.targets.tolist() == [[2, 7]]
    assert plan.merged.tolist() == [[3, 4, 5, 6, 8, 9, 10, 11, 12]]
    # R = 11 is not a multiple of K_ctx = 4: step = 11 // 4 = 2, slots 0, 2, 4, 6 of the
    # remaining rows 2..12 (floor(i * 11 / 4) would give slots 0, 2, 5, 8: rows 2, 4, 7, 10).
    plan = _plan(keys, saliency, 6, VisionZipOptions(dominant_ratio=1 / 3))  # K_dom = 2
    assert plan.targets.tolist() == [[2, 4, 6, 8]]
    assert plan.merged.tolist() == [[3, 5, 7, 9, 10, 11, 12]]
    # K_ctx > R / 2: step 1, the first K_ctx remaining rows.
    plan = _plan(keys, saliency, 10, VisionZipOptions(dominant_ratio=0.2))  # K_dom = 2, K_ctx = 8
    assert plan.targets.tolist() == [[2, 3, 4, 5, 6, 7, 8, 9]]


def test_merged_token_is_target_plus_mean_of_assigned() -> None:
    tokens, keys, saliency = crafted_case()
    plan = _plan(keys, saliency, 4, HALF)
    assert plan.assignment.tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 1]]
    out = visionzip_merge(tokens, keys, saliency, 4, HALF)
    t = tokens[0]
    expected_first = t[2] + t[[3, 4, 11]].mean(dim=0)
    expected_second = t[7] + t[[5, 6, 8, 9, 10, 12]].mean(dim=0)
    assert torch.equal(out[0, :2], t[[0, 1]])
    torch.testing.assert_close(out[0, 2], expected_first, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 3], expected_second, rtol=0, atol=1e-6)


def test_assignment_follows_keys_not_values() -> None:
    tokens, keys, saliency = crafted_case()
    # Row 5 gets the VALUE of target row 2 but keeps a key like target row 7.
    tokens[0, 5] = tokens[0, 2]
    plan = _plan(keys, saliency, 4, HALF)
    assert plan.assignment[0, plan.merged[0].tolist().index(5)] == 1
    # And row 9 gets the KEY of target row 2 while its value is unchanged.
    keys[0, 9] = keys[0, 2]
    plan = _plan(keys, saliency, 4, HALF)
    assert plan.assignment[0, plan.merged[0].tolist().index(9)] == 0
    out = visionzip_merge(tokens, keys, saliency, 4, HALF)
    t = tokens[0]
    torch.testing.assert_close(out[0, 2], t[2] + t[[3, 4, 9, 11]].mean(dim=0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 3], t[7] + t[[5, 6, 8, 10, 12]].mean(dim=0), rtol=0, atol=1e-6)


def test_assignment_uses_cosine_not_raw_dot_product() -> None:
    tokens, keys, saliency = crafted_case()
    e1, e2 = torch.eye(2)
    keys[0, 7] = 5.0 * (e1 + e2) / 2**0.5  # long key on target row 7
    keys[0, 5] = torch.tensor([1.0, 0.2])  # cosine: 0.98 to row 2, 0.83 to row 7; dot: 1 vs 4.2
    plan = _plan(keys, saliency, 4, HALF)
    assert plan.assignment[0, plan.merged[0].tolist().index(5)] == 0


def test_cosine_ties_go_to_lowest_target_and_empty_target_is_itself() -> None:
    tokens, keys, saliency = crafted_case()
    e1, e2 = torch.eye(2)
    keys[0, 2:] = e1 + e2  # every remaining row equally similar to both targets
    keys[0, 2] = e1
    keys[0, 7] = e2
    plan = _plan(keys, saliency, 4, HALF)
    assert plan.assignment.tolist() == [[0] * 9]
    out = visionzip_merge(tokens, keys, saliency, 4, HALF)
    t = tokens[0]
    torch.testing.assert_close(out[0, 2], t[2] + t[plan.merged[0]].mean(dim=0), rtol=0, atol=1e-6)
    assert torch.equal(out[0, 3], t[7])


@pytest.mark.parametrize(("k", "seed"), [(2, 3), (9, 4), (30, 5), (64, 6)])
def test_matches_naive_loop_reference(k: int, seed: int) -> None:
    tokens, keys, saliency = random_inputs(batch=2, n=100, dv=12, dk=6, seed=seed)
    k_dom = _dominant_budget(k, DEFAULT)
    out = visionzip_merge(tokens, keys, saliency, k, DEFAULT)
    for b in range(2):
        expected = naive_visionzip(tokens[b], keys[b], saliency[b], k_dom, k - k_dom)
        torch.testing.assert_close(out[b].double(), expected, rtol=0, atol=1e-5)


def test_bfloat16_inputs_use_float32_math() -> None:
    tokens, keys, saliency = crafted_case()
    tokens16 = tokens.bfloat16()
    out = visionzip_merge(tokens16, keys.bfloat16(), saliency, 4, HALF)
    t = tokens16[0].float()
    expected = (t[2] + t[[3, 4, 11]].mean(dim=0)).bfloat16()
    assert torch.equal(out[0, 2], expected)
    assert torch.equal(out[0, :2], tokens16[0, [0, 1]])


def test_deterministic() -> None:
    tokens, keys, saliency = random_inputs(batch=2, n=200, dv=32, seed=7)
    first = visionzip_merge(tokens, keys, saliency, 40, DEFAULT)
    again = visionzip_merge(tokens.clone(), keys.clone(), saliency.clone(), 40, DEFAULT)
    assert torch.equal(first, again)


def test_batch_equals_per_image() -> None:
    tokens, keys, saliency = random_inputs(batch=4, n=120, dv=24, seed=8)
    batched = visionzip_merge(tokens, keys, saliency, 25, DEFAULT)
    for b in range(4):
        single = visionzip_merge(tokens[b : b + 1], keys[b : b + 1], saliency[b : b + 1], 25, DEFAULT)
        torch.testing.assert_close(batched[b : b + 1], single, rtol=0, atol=1e-6)
    # Per-image plans differ (otherwise this test would not exercise batching).
    plans = _plan(keys, saliency, 25, DEFAULT)
    assert not torch.equal(plans.dominant[0], plans.dominant[1])


def test_k_one_is_cls_only() -> None:
    tokens, keys, saliency = random_inputs(batch=2, n=30, seed=9)
    for ratio in (54 / 64, 0.01, 1.0):
        out = visionzip_merge(tokens, keys, saliency, 1, VisionZipOptions(dominant_ratio=ratio))
        assert torch.equal(out, tokens[:, :1])


def test_all_dominant_ratio_is_pure_selection() -> None:
    tokens, keys, saliency = random_inputs(batch=1, n=30, seed=10)
    out = visionzip_merge(tokens, keys, saliency, 6, VisionZipOptions(dominant_ratio=1.0))
    rows = [0] + sorted((torch.topk(saliency[0], 5).indices + 1).tolist())
    assert torch.equal(out[0], tokens[0, rows])
    plan = _plan(keys, saliency, 6, VisionZipOptions(dominant_ratio=1.0))
    assert plan.targets.shape == plan.merged.shape == plan.assignment.shape == (1, 0)


@pytest.mark.parametrize("k", [30, 31, 1000])
def test_k_at_least_n_returns_the_patch_rows(k: int) -> None:
    tokens, keys, saliency = random_inputs(batch=2, n=30, seed=11)
    assert torch.equal(visionzip_merge(tokens, keys, saliency, k, DEFAULT), tokens[:, 1:])


def test_invalid_inputs_are_clear_errors() -> None:
    tokens, keys, saliency = random_inputs(batch=2, n=30, seed=12)
    for k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="keep must be an integer >= 1"):
            visionzip_merge(tokens, keys, saliency, k, DEFAULT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CLS"):
        visionzip_merge(tokens[:, 1:], keys, saliency, 5, DEFAULT)
    with pytest.raises(ValueError, match="expects"):
        visionzip_merge(tokens[0], keys[0], saliency[0], 5, DEFAULT)
    for bad in ({"dominant_ratio": 0.0}, {"dominant_ratio": 1.5}, {"ratio": 0.5}):
        with pytest.raises(ValueError):
            VisionZipOptions(**bad)
