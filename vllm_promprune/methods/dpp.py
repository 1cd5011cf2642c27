"""Fast greedy MAP inference for a DPP with a cosine kernel, batched over images.

Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process"
(NeurIPS 2018): incremental Cholesky over the precomputed kernel L = Y Y^T.
One batched GEMM builds L (O(N^2 D), compute-bound); each of the k steps then
reads one kernel row and does O(k N) vector work. Computing a row per step
instead (k GEMVs, O(k N D) but memory-bound) measured slower on CPU at every
size the benchmark covers. The loop runs on the tensors' device with no host
synchronisation: the chosen indices stay tensors used through gather/scatter.
"""

from __future__ import annotations

import torch

from .common import COSINE_EPS, FINE_EPS, cosine_matrix, row_norms

_PIVOT_FLOOR = 1e-8


def least_covered(kernel: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Per image, the unselected token whose max cosine to the selected ones is smallest.

    Args:
        kernel: [B, N, N] cosine kernel. selected: [B, N] bool, at least one True per image.

    Returns:
        [B] int64 indices; exactly equal coverages go to the lowest index (`torch.argmin`).
    """
    coverage = kernel.masked_fill(~selected[:, None, :], float("-inf")).amax(dim=2)
    return coverage.masked_fill(selected, float("inf")).argmin(dim=1)


def dpp_kernel(
    features: torch.Tensor, cosine: torch.Tensor | None = None, norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosine kernel L = Y Y^T [B, N, N] of the eps-1e-6 unit rows of features [B, N, D].

    `cosine`, the same product for eps-1e-8 unit rows, is rescaled in place and
    returned instead of recomputed: the two differ only for rows with norm below
    1e-6, and every other row's factor is exactly 1 (no host check whether any row
    is that small). `norms` [B, N] are the features' `row_norms` if the caller has them.
    """
    if norms is None:
        norms = row_norms(features)
    if cosine is None:
        return cosine_matrix(features, COSINE_EPS, norms)
    scale = norms.clamp_min(FINE_EPS) / norms.clamp_min(COSINE_EPS)  # [B, N], 1 unless tiny
    return cosine.mul_(scale[:, :, None]).mul_(scale[:, None, :])


def structural_first_pick(norms: torch.Tensor) -> torch.Tensor:
    """The DPP's first pick when nothing is selected yet, per image: [B] int64.

    `norms` [B, N] are the tokens' L2 norms (`row_norms`). The first pick is the
    argmax of the kernel diagonal, ||y_i||^2 for the eps-1e-6 unit rows y_i: exactly
    1 for every token whose norm is at least 1e-6 (a structural tie: the lowest such
    index, whatever float rounding says), and (norm / 1e-6)^2 < 1 below that.
    Ranking min(norm, 1e-6) gives exactly this.
    """
    return norms.clamp_max(COSINE_EPS).argmax(dim=1)


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
            least-covered token); otherwise it is `structural_first_pick`: the
            lowest index among tokens whose kernel diagonal is 1 in exact
            arithmetic (every token but near-zero ones), whatever rounding says.

    Returns:
        [B, k] int64 indices in pick order, distinct within each image.

    Exactly `k` tokens are always returned (no early stop): residual gains are
    clamped at 0, the pivot is sqrt(max(d^2, 1e-8)), each step takes the
    `torch.argmax` of the gains (exactly equal floats: the lowest index), and
    picked tokens are masked so they can never be chosen again.
    Greedy picks do not depend on k, so a caller needing k_b <= k tokens for
    image b may take the first k_b columns.
    """
    norms = row_norms(features)
    return dpp_from_kernel(dpp_kernel(features, norms=norms), structural_first_pick(norms), k, selected=selected)


def dpp_from_kernel(
    kernel: torch.Tensor, first: torch.Tensor, k: int, *, selected: torch.Tensor | None = None
) -> torch.Tensor:
    """`dpp_greedy_map` on a precomputed cosine kernel [B, N, N]; `first` [B] is the
    `structural_first_pick` of the features, used for images with nothing selected."""
    batch, num_tokens, _ = kernel.shape
    device = kernel.device
    picked = torch.zeros(batch, k, dtype=torch.long, device=device)
    if k == 0:
        return picked
    gains = kernel.diagonal(dim1=1, dim2=2).clone()  # residual marginal gains
    taken = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    if selected is not None:
        taken |= selected

    current = first
    if selected is not None:  # images without a selection keep `first` (no host check whether any has one)
        has_selection = selected.any(dim=1)
        current = torch.where(has_selection, least_covered(kernel, selected | ~has_selection[:, None]), current)

    # The kernel row of each image's pick comes from a flat [B * N, N] view with one
    # index_select (few small ops per step: the loop is dispatch-bound at B = 1).
    flat_kernel = kernel.reshape(batch * num_tokens, num_tokens)
    flat_gains, flat_taken = gains.view(-1), taken.view(-1)
    row_offsets = torch.arange(0, batch * num_tokens, num_tokens, device=device)
    cholesky_rows = torch.zeros(batch, k, num_tokens, dtype=torch.float32, device=device)
    for step in range(k):
        picked[:, step] = current
        if step == k - 1:
            break
        rows = current + row_offsets  # [B] rows of the flat views
        flat_taken.index_fill_(0, rows, True)
        pivot = flat_gains.index_select(0, rows).clamp_min_(_PIVOT_FLOOR).sqrt_()[:, None]  # [B, 1]
        earlier = cholesky_rows[:, :step]  # [B, step, N]
        column = earlier.gather(2, current[:, None, None].expand(-1, step, 1))  # [B, step, 1]
        projection = torch.bmm(column.transpose(1, 2), earlier).squeeze(1)  # [B, N]
        new_row = cholesky_rows[:, step]
        torch.sub(flat_kernel.index_select(0, rows), projection, out=new_row)
        new_row.div_(pivot)
        gains.sub_(new_row * new_row).clamp_min_(0.0)
        current = gains.masked_fill(taken, float("-inf")).argmax(dim=1)
    return picked
