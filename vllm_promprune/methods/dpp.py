"""Fast greedy MAP inference for a DPP with a cosine kernel, batched over images.

Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process"
(NeurIPS 2018): incremental Cholesky, one kernel row per step, O(k * N * D).
The loop runs k steps on the tensors' device with no host synchronisation: the
chosen indices stay tensors and are used through gather/scatter.
"""

from __future__ import annotations

import torch

from .common import first_near_max, gather_rows, unit_rows

_FEATURE_EPS = 1e-6
_PIVOT_FLOOR = 1e-8
# The kernel diagonal of unit rows is 1 up to float32 rounding; values this close
# to the maximum count as ties, so the first pick does not depend on rounding noise.
_DIAGONAL_TIE = 1e-5


def least_covered(y: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Per image, the unselected token whose max cosine to the selected ones is smallest.

    Args:
        y: [B, N, D] unit rows. selected: [B, N] bool, at least one True per image.

    Returns:
        [B] int64 indices (ties -> lowest index).
    """
    # Compare against the selected rows only (padded to the largest selection).
    count = selected.sum(dim=1)
    width = int(count.max())  # one sync per call, not per step
    order = torch.sort(selected.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    chosen = gather_rows(y, order)  # [B, S, D]
    similarity = torch.bmm(y, chosen.transpose(1, 2))  # [B, N, S]
    valid = torch.arange(width, device=y.device)[None, :] < count[:, None]  # [B, S]
    coverage = similarity.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=2)
    return coverage.masked_fill(selected, float("inf")).argmin(dim=1)


def dpp_greedy_map(
    features: torch.Tensor,
    k: int,
    *,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick `k` diverse tokens per image by greedy DPP MAP with kernel L = Y Y^T.

    Args:
        features: [B, N, D] token features (any float dtype; math in float32).
        k: tokens to pick per image, 0 <= k <= N - (selected count of every image).
        selected: optional [B, N] bool, tokens already chosen by an earlier stage.
            They are never returned. Where an image has any, its first pick is the
            token whose maximum cosine similarity to them is smallest (the
            least-covered token); otherwise it is the argmax of the kernel diagonal,
            where values within 1e-5 of the maximum tie (all are 1 but for
            rounding) and ties go to the lowest index.

    Returns:
        [B, k] int64 indices in pick order, distinct within each image.

    Exactly `k` tokens are always returned (no early stop): residual gains are
    clamped at 0, the pivot is sqrt(max(d^2, 1e-8)), ties go to the lowest
    index, and picked tokens are masked so they can never be chosen again.
    Greedy picks do not depend on k, so a caller needing k_b <= k tokens for
    image b may take the first k_b columns.
    """
    batch, num_tokens, _ = features.shape
    device = features.device
    picked = torch.zeros(batch, k, dtype=torch.long, device=device)
    if k == 0:
        return picked
    y = unit_rows(features, _FEATURE_EPS)
    gains = (y * y).sum(dim=-1)  # [B, N] diagonal of L, residual marginal gains
    taken = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    if selected is not None:
        taken |= selected

    current = first_near_max(gains, _DIAGONAL_TIE)
    if selected is not None and bool(selected.any()):
        has_selection = selected.any(dim=1)
        current = torch.where(has_selection, least_covered(y, selected | ~has_selection[:, None]), current)

    cholesky_rows = torch.zeros(batch, k, num_tokens, dtype=torch.float32, device=device)
    for step in range(k):
        picked[:, step] = current
        if step == k - 1:
            break
        index = current[:, None]
        taken.scatter_(1, index, True)
        pivot = gains.gather(1, index).clamp_min(_PIVOT_FLOOR).sqrt()  # [B, 1]
        kernel_row = torch.bmm(y, gather_rows(y, index).transpose(1, 2)).squeeze(2)  # [B, N]
        earlier = cholesky_rows[:, :step]  # [B, step, N]
        projection = (earlier.gather(2, index[:, None, :].expand(-1, step, 1)) * earlier).sum(dim=1)
        new_row = (kernel_row - projection) / pivot
        cholesky_rows[:, step] = new_row
        gains = (gains - new_row * new_row).clamp_min(0.0)
        current = gains.masked_fill(taken, float("-inf")).argmax(dim=1)
    return picked
