"""VisionZip: keep dominant tokens, merge the rest into a few contextual tokens.

Specification: methods.md ("Baselines"). Unlike the selection methods it builds
new pre-projector token vectors, which the model then projects:
1. Dominant: CLS + the K_dom - 1 patches with the highest CLS attention.
2. Contextual: K_ctx = K - K_dom targets among the R remaining patches, at the
   reference's stride max(1, R // K_ctx); every other remaining patch is merged
   into the target whose head-mean attention key is most similar (cosine),
   giving `target + mean(assigned)`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field

from .common import COSINE_EPS, check_keep, gather_rows, unit_rows


class VisionZipOptions(BaseModel):
    """Budget split of VisionZip (default: the published 54 + 10 of 64 share)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dominant_ratio: float = Field(
        54 / 64,
        gt=0.0,
        le=1.0,
        description=(
            "Share of the K output tokens that are dominant tokens (CLS included): "
            "K_dom = max(1, round_half_to_even(K * ratio)), at most K; the other "
            "K - K_dom are merged contextual tokens. Default 54/64 reproduces the "
            "published 54+10, 108+20 and 162+30 splits of 64, 128 and 192."
        ),
    )


class _Plan(NamedTuple):
    """Which rows VisionZip keeps and merges; indices are rows of the [B, N+1] layout."""

    dominant: torch.Tensor  # [B, K_dom] ascending, column 0 is CLS (row 0)
    targets: torch.Tensor  # [B, K_ctx] ascending
    merged: torch.Tensor  # [B, R - K_ctx] ascending, non-target remaining rows; [B, 0] if K_ctx = 0
    assignment: torch.Tensor  # like `merged`: the column of `targets` each merged row joins


def _dominant_budget(k: int, options: VisionZipOptions) -> int:
    """K_dom = max(1, round_half_to_even(k * ratio)) clamped to k (Python float64 round)."""
    return min(k, max(1, round(k * options.dominant_ratio)))


def _plan(keys: torch.Tensor, saliency: torch.Tensor, k: int, options: VisionZipOptions) -> _Plan:
    """Dominant rows, contextual targets and the merge assignment for 1 <= k < N.

    Args:
        keys: [B, N+1, Dk] head-mean attention keys, CLS row first.
        saliency: [B, N] CLS attention of the N patches (only the order matters).

    Dominant patches: the set of the reference's `saliency.topk(K_dom - 1, dim=1)`
    (equal saliencies at the boundary go where topk puts them).
    The R = N - (K_dom - 1) remaining patches, in ascending position, supply the
    targets at list positions i * max(1, R // K_ctx), i = 0..K_ctx-1: the
    reference's stride (integer division first, so the targets do not spread to
    the end of the list unless K_ctx divides R). Each other remaining patch joins
    the target with the largest key cosine similarity (ties -> lowest target).
    """
    batch, num_patches = saliency.shape
    device = saliency.device
    k_dom = _dominant_budget(k, options)
    k_ctx = k - k_dom
    num_remaining = num_patches - (k_dom - 1)
    top = saliency.float().topk(k_dom - 1, dim=1).indices + 1  # rows of the dominant patches
    cls_row = torch.zeros(batch, 1, dtype=torch.long, device=device)
    dominant = torch.cat([cls_row, torch.sort(top, dim=1).values], dim=1)
    is_dominant = torch.zeros(batch, num_patches + 1, dtype=torch.int8, device=device).scatter_(1, top, 1)
    is_dominant[:, 0] = 1
    # Remaining patch rows ascending without a boolean mask (a host sync on GPU).
    remaining = torch.sort(is_dominant, dim=1, stable=True).indices[:, :num_remaining]  # [B, R]

    target_slots = torch.arange(k_ctx, device=device) * max(1, num_remaining // max(k_ctx, 1))
    is_target = torch.zeros(num_remaining, dtype=torch.int8, device=device)
    is_target[target_slots] = 1
    # Non-target slots in ascending order without a boolean mask (a host sync on GPU).
    other_slots = torch.sort(is_target, stable=True).indices[: num_remaining - k_ctx]
    targets = remaining[:, target_slots]
    merged = remaining[:, other_slots]
    if k_ctx == 0:  # pure selection: the remaining rows are dropped, nothing is merged
        nothing = remaining[:, :0]
        return _Plan(dominant, targets, nothing, nothing)

    merged_keys = unit_rows(gather_rows(keys, merged), COSINE_EPS)
    target_keys = unit_rows(gather_rows(keys, targets), COSINE_EPS)
    similarity = torch.bmm(merged_keys, target_keys.transpose(1, 2))  # [B, R - K_ctx, K_ctx]
    assignment = similarity.argmax(dim=2)  # first maximum -> lowest target
    return _Plan(dominant, targets, merged, assignment)


def visionzip_merge(
    tokens: torch.Tensor,
    keys: torch.Tensor,
    saliency: torch.Tensor,
    k: int,
    options: VisionZipOptions,
) -> torch.Tensor:
    """VisionZip's K pre-projector tokens per image, batched.

    Args:
        tokens: [B, N+1, Dv] hidden states of the selected layer, CLS row first.
        keys: [B, N+1, Dk] that layer's attention keys averaged over heads, same rows.
        saliency: [B, N] CLS attention of the N patches (head mean or sum).
        k: output tokens per image, >= 1. K_dom = max(1, round_half_to_even(k *
            dominant_ratio)), clamped to k, of them are dominant (CLS included)
            and K_ctx = k - K_dom are contextual.
        options: the budget split.

    Returns:
        [B, k, Dv] in `tokens.dtype`: the dominant rows copied unchanged in
        ascending position (CLS first), then the contextual tokens in target
        position order, each `target + mean(rows merged into it)` computed in
        float32 (a target nothing is merged into is returned as itself).
        k >= N is the identity of the unpruned model: the N patch rows
        `tokens[:, 1:]` ([B, N, Dv], no CLS), unchanged.
    """
    k = check_keep(k)
    if tokens.dim() != 3 or keys.dim() != 3 or saliency.dim() != 2:
        raise ValueError(
            "visionzip_merge expects tokens [B, N+1, Dv], keys [B, N+1, Dk], saliency [B, N]; "
            f"got {tuple(tokens.shape)}, {tuple(keys.shape)}, {tuple(saliency.shape)}"
        )
    batch, num_patches = saliency.shape
    if tokens.shape[:2] != (batch, num_patches + 1) or keys.shape[:2] != (batch, num_patches + 1):
        raise ValueError(
            f"tokens and keys must have {num_patches + 1} rows (CLS + N patches) for "
            f"saliency of shape {tuple(saliency.shape)}; got tokens {tuple(tokens.shape)}, "
            f"keys {tuple(keys.shape)}"
        )
    if k >= num_patches:
        return tokens[:, 1:]

    plan = _plan(keys, saliency, k, options)
    dominant = gather_rows(tokens, plan.dominant)
    if plan.targets.shape[1] == 0:
        return dominant
    # Summing through a one-hot matmul rather than scatter_add/index_add: on CUDA
    # those use float atomics whose summation order, hence rounding, varies per run.
    one_hot = torch.zeros(
        batch, plan.targets.shape[1], plan.merged.shape[1], dtype=torch.float32, device=tokens.device
    )
    one_hot.scatter_(1, plan.assignment[:, None, :], 1.0)  # [B, K_ctx, R - K_ctx]
    sums = torch.bmm(one_hot, gather_rows(tokens, plan.merged).float())  # [B, K_ctx, Dv]
    counts = one_hot.sum(dim=2, keepdim=True).clamp_min(1.0)
    contextual = gather_rows(tokens, plan.targets).float() + sums / counts
    return torch.cat([dominant, contextual.to(tokens.dtype)], dim=1)
