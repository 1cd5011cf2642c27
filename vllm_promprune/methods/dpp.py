"""Fast greedy MAP inference for a DPP with a cosine kernel.

Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process"
(NeurIPS 2018): incremental Cholesky, one kernel row per step, O(k * M * D).
The loop runs k steps on the tensor's device with no host synchronisation:
the chosen index stays a 0-d tensor and is used for indexing directly.
"""

from __future__ import annotations

import torch

from .common import unit_rows

_FEATURE_EPS = 1e-6
_PIVOT_FLOOR = 1e-8
# The kernel diagonal of unit rows is 1 up to float32 rounding; values this close
# to the maximum count as ties, so the first pick does not depend on rounding noise.
_DIAGONAL_TIE = 1e-5


def dpp_greedy_map(
    features: torch.Tensor,
    k: int,
    *,
    covered_by: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick `k` diverse rows of `features` by greedy DPP MAP with kernel L = Y Y^T.

    Args:
        features: [M, D] candidate features (any float dtype; math in float32).
        k: number of rows to pick, 0 <= k <= M.
        covered_by: optional [S, D] features already selected by another stage.
            If given (S > 0), the first pick is the candidate whose maximum cosine
            similarity to any of them is smallest (the least-covered candidate);
            otherwise the first pick is the argmax of the kernel diagonal, where
            values within 1e-5 of the maximum tie (all are 1 but for rounding)
            and ties go to the lowest index.

    Returns:
        [k] int64 indices into `features`, in pick order, all distinct.

    Exactly `k` rows are always returned (no early stop): residual gains are
    clamped at 0, the pivot is sqrt(max(d^2, 1e-8)), ties go to the lowest
    index, and picked rows are masked so they can never be chosen again.
    """
    num_candidates = features.shape[0]
    if not 0 <= k <= num_candidates:
        raise ValueError(f"k must be in [0, {num_candidates}], got {k}")
    device = features.device
    picked = torch.empty(k, dtype=torch.long, device=device)
    if k == 0:
        return picked

    y = unit_rows(features, _FEATURE_EPS)
    gains = (y * y).sum(dim=-1)  # diagonal of L, residual marginal gains
    cholesky_rows = torch.zeros(k, num_candidates, dtype=torch.float32, device=device)
    taken = torch.zeros(num_candidates, dtype=torch.bool, device=device)

    if covered_by is not None and covered_by.shape[0] > 0:
        coverage = y @ unit_rows(covered_by, _FEATURE_EPS).T  # [M, S]
        current = coverage.amax(dim=1).argmin()
    else:
        near_max = gains >= gains.max() - _DIAGONAL_TIE
        current = near_max.to(torch.int8).argmax()  # first True: no host sync

    for step in range(k):
        picked[step] = current
        if step == k - 1:
            break
        taken[current] = True
        pivot = gains[current].clamp_min(_PIVOT_FLOOR).sqrt()
        kernel_row = y @ y[current]  # [M]
        projection = cholesky_rows[:step, current] @ cholesky_rows[:step]
        new_row = (kernel_row - projection) / pivot
        cholesky_rows[step] = new_row
        gains = (gains - new_row * new_row).clamp_min(0.0)
        current = gains.masked_fill(taken, float("-inf")).argmax()
    return picked
