"""PruneSID: group by principal components, de-duplicate within groups, share the budget.

Seed paper: "Prune Redundancy, Preserve Essence" (ICLR 2026). Specification: methods.md.
1. PSCA grouping: PCA of sigmoid(patch features) with tokens as variables; each
   token joins the component with its largest |loading|.
2. Redundancy rho = mean pairwise cosine of the patch features; NMS threshold
   thr = (n / 32) * rho.
3. NMS inside every group (all groups per round), by CLS attention.
4. Quotas per group from the survivor counts; each group gives its top members.
PruneSID-Dyn (§3.4) scales each image's budget by 1 - rho; see
`prunesid_dynamic_budgets`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .common import FINE_EPS, check_keep, gram_matrix, unit_rows

_THRESHOLD_SCALE = 32  # thr = (n / 32) * rho
_UPPER_UNIT = 64  # group upper bound 5 * ceil(n / 64)
_UPPER_PER_UNIT = 5
_POWER_ITERATIONS = 2
_LOWRANK_SEED = 0
# A fully redundant image (rho = 1) still gets a positive weight, so the budgets
# can always reach the requested total when the caps allow it.
_PHI_FLOOR = 1e-6


class PruneSIDOptions(BaseModel):
    """PruneSID knobs: only the PCA solver is a choice; every constant is the spec's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pca: Literal["exact", "lowrank"] = Field(
        "exact",
        description=(
            "PCA solver for the grouping: 'exact' = full SVD of the centred matrix; "
            "'lowrank' = randomised range finder with 2 power iterations (as the "
            "reference's pca_lowrank) seeded with a local generator (seed 0)."
        ),
    )


def redundancy(patch_features: torch.Tensor) -> torch.Tensor:
    """rho: mean cosine similarity over pairs i < j of patch features [N, D].

    Rows are L2-normalised in float32 (norm clamped at 1e-8). Returns a float32
    0-d tensor; 0 when N < 2 (no pairs).
    """
    if patch_features.dim() != 2:
        raise ValueError(f"patch_features must have shape [N, D], got {tuple(patch_features.shape)}")
    return _mean_pair_cosine(unit_rows(patch_features, FINE_EPS))


def _mean_pair_cosine(y: torch.Tensor) -> torch.Tensor:
    # sum_{i<j} y_i.y_j = (|sum_i y_i|^2 - sum_i |y_i|^2) / 2: O(N D), no N x N matrix.
    num_tokens = y.shape[0]
    if num_tokens < 2:
        return y.new_zeros(())
    total = y.sum(dim=0)
    pair_sum = (total @ total - (y * y).sum()) / 2
    return pair_sum / (num_tokens * (num_tokens - 1) / 2)


def _principal_axes(centred: torch.Tensor, q: int, pca: str) -> torch.Tensor:
    """Top-q right singular vectors [M, q] of `centred` [R, M] (float32).

    Sign convention: each vector is flipped so its largest-magnitude entry
    (first one on ties) is positive. PruneSID only uses |V|, so the sign never
    changes a grouping; it just makes the returned axes reproducible.
    """
    if pca == "exact":
        axes = torch.linalg.svd(centred, full_matrices=False).Vh[:q].T
    else:
        axes = _lowrank_axes(centred, q)
    peak = axes.abs().argmax(dim=0, keepdim=True)
    sign = torch.where(axes.gather(0, peak) < 0, -1.0, 1.0)
    return axes * sign


def _lowrank_axes(centred: torch.Tensor, q: int) -> torch.Tensor:
    """Randomised range finder (Halko et al.) with 2 power iterations, like pca_lowrank.

    torch.pca_lowrank draws its test matrix from the global RNG and takes no
    generator, so it is re-implemented with a local CPU generator seeded with 0
    (same draw on every device), then moved to the data's device.
    """
    generator = torch.Generator().manual_seed(_LOWRANK_SEED)
    test = torch.randn(centred.shape[1], q, generator=generator).to(centred.device)
    basis = torch.linalg.qr(centred @ test).Q  # [R, q]
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(centred.T @ basis).Q  # [M, q]
        basis = torch.linalg.qr(centred @ basis).Q  # [R, q]
    return torch.linalg.svd(basis.T @ centred, full_matrices=False).Vh.T  # [M, q]


def _psca_groups(patch_features: torch.Tensor, q: int, pca: str) -> torch.Tensor:
    """Group index [N] (int64, in [0, q)) of each patch token [N, Dv].

    S = sigmoid(features) as [Dv, N] (features are samples, tokens variables),
    centred per token over the features; group = argmax_j |V[i, j]|, ties -> lowest j.
    q is clipped to min(Dv, N), the number of singular vectors that exist.
    """
    samples = torch.sigmoid(patch_features.float()).T  # [Dv, N]
    centred = samples - samples.mean(dim=0, keepdim=True)
    q = min(q, *centred.shape)
    return _principal_axes(centred, q, pca).abs().argmax(dim=1)


def _group_members(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[G, N] bool: token i is in group g, for the group index [N] of each token."""
    return group[None, :] == torch.arange(num_groups, device=group.device)[:, None]


def _nms_rounds(
    group: torch.Tensor,
    cosine: torch.Tensor,
    priority: torch.Tensor,
    threshold: torch.Tensor | float,
    num_groups: int,
    max_rounds: int,
) -> torch.Tensor:
    """Intra-group NMS, all groups advancing together, on the tensors' device.

    Args:
        group: [N] int64 group of each token. cosine: [N, N] pairwise cosine.
        priority: [N] int64, unique and > 0, higher = more attention.
        threshold: suppress group members whose cosine to the pick exceeds it.
        max_rounds: an upper bound on the rounds needed (the largest group size).

    Returns:
        [N] int64: the round in which each survivor was picked, N for suppressed tokens.

    All `max_rounds` rounds run (a round in which no group has a candidate changes
    nothing): stopping early would need a host read of the candidates every round.
    """
    num_tokens = group.shape[0]
    device = group.device
    member = _group_members(group, num_groups)  # [G, N]
    candidate = torch.ones(num_tokens, dtype=torch.bool, device=device)
    pick_round = torch.full((num_tokens,), num_tokens, dtype=torch.long, device=device)
    positions = torch.arange(num_tokens, device=device)
    for step in range(max_rounds):
        live = member & candidate[None, :]
        score = torch.where(live, priority[None, :], 0)
        best = score.argmax(dim=1)  # [G]; meaningless (0) for groups with no candidate
        active = score.gather(1, best[:, None]) > 0  # [G, 1]
        picked = (live & (positions[None, :] == best[:, None]) & active).any(dim=0)  # [N]
        suppressed = (live & (cosine[best] > threshold) & active).any(dim=0)
        pick_round = torch.where(picked, step, pick_round)
        candidate &= ~(picked | suppressed)
    return pick_round


def _quotas(group_sizes: torch.Tensor, survivors: torch.Tensor, n: int) -> torch.Tensor:
    """Patch tokens each group gives [G] (int64), summing to n - 1 (n counts the CLS token).

    `group_sizes` c [G] and `survivors` s [G] are int64 counts on one device; the
    quotas are computed there with no host read. Lower bound min(1, c_k); upper
    bound min(5 * ceil(n / 64), c_k, s_k), raised by 1 for all groups (capped at
    c_k) while the bounds sum to less than n. The n - 1 - sum(lower) spare tokens
    are split by s_k / sum(s) with cumulative rounding computed as the reference
    computes it: `torch.round` of the float32 running sum `torch.cumsum(s_k / sum(s))`
    times the spare count, then differences; the lower bound is added and the upper
    bound applied. Then groups are filled up to their upper bound, each in turn, in
    the order `torch.argsort(s, descending=True)` gives for the int64 counts (among
    equal counts that is torch's order, not ascending group index), until the total
    is n - 1.

    Preconditions (not checked: checking reads values): sum(c) >= n - 1 and
    at most n - 1 non-empty groups; `prunesid_select` guarantees both (every patch
    token is in a group, n <= N, and q = max(int(n / 4), 1) <= n - 1 groups).
    Why the total is then exactly n - 1: before capping the quotas sum to n - 1,
    and capping only lowers them, so only a deficit is possible. The raising stops
    with sum(upper) >= n, or with upper == c for all groups, i.e. sum(upper) =
    sum(c) >= n - 1. Either way the top-up can fill the deficit.
    """
    target = n - 1
    if target <= 0:
        return torch.zeros_like(group_sizes)
    lower = group_sizes.clamp_max(1)
    bound = _UPPER_PER_UNIT * math.ceil(n / _UPPER_UNIT)
    upper = torch.minimum(group_sizes, survivors).clamp_max(bound)
    # The raising, all at once: raise by the first t in 0..n at which the bounds reach
    # n or all sit at c (by t = n one of the two holds: a group with c_k >= n reaches
    # n alone, otherwise every u_k + n exceeds c_k).
    raises = torch.arange(n + 1, device=upper.device)
    raised = torch.minimum(upper + raises[:, None], group_sizes)  # [n + 1, G]
    stops = (raised.sum(dim=1) >= n) | (raises >= (group_sizes - upper).max())
    upper = raised.index_select(0, stops.to(torch.uint8).argmax().view(1)).squeeze(0)  # first stop

    spare = target - lower.sum()
    shares = survivors.float() / survivors.sum().clamp_min(1)
    cumulative = torch.round(torch.cumsum(shares, dim=0) * spare).long()
    spread = cumulative.diff(prepend=cumulative.new_zeros(1))
    quotas = torch.minimum(lower + spread, upper)

    # Top-up: in that order, each group takes min(its room, what is still missing).
    order = torch.argsort(survivors, descending=True)
    room = (upper - quotas)[order]
    missing = (target - quotas.sum() - (torch.cumsum(room, dim=0) - room)).clamp_min(0)
    return quotas + torch.zeros_like(quotas).scatter_(0, order, torch.minimum(room, missing))


def prunesid_select(
    tokens: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    options: PruneSIDOptions,
) -> torch.Tensor:
    """PruneSID selection for one image.

    Args:
        tokens: [N + 1, Dv] pre-projector features, CLS in row 0, patch i in row i + 1.
        saliency: [N] CLS attention of the patch tokens (head sum or mean: only the
            order of `argsort(dim=1, descending=True)` of it is used).
        keep: n, the budget counting the CLS token, 1 <= n <= N. n >= N + 1 keeps
            all N + 1 rows (identity).
        options: PCA solver.

    Returns:
        [n] int64 unique row indices: 0 (CLS) first, then each group's top q_k
        members, groups in index order, members ranked as NMS survivors in pick
        order, then suppressed members, both in that argsort order of attention.
    """
    keep = check_keep(keep)
    if tokens.dim() != 2 or tokens.shape[0] < 2:
        raise ValueError(f"tokens must have shape [N + 1, Dv] with N >= 1, got {tuple(tokens.shape)}")
    num_tokens = tokens.shape[0] - 1
    if saliency.shape != (num_tokens,):
        raise ValueError(f"saliency must have shape [{num_tokens}], got {tuple(saliency.shape)}")
    device = tokens.device
    if keep > num_tokens:
        return torch.arange(num_tokens + 1, device=device)
    if keep == 1:
        return torch.zeros(1, dtype=torch.long, device=device)

    patches = tokens[1:]
    num_groups = min(max(keep // 4, 1), *patches.shape)
    group = _psca_groups(patches, num_groups, options.pca)
    member = _group_members(group, num_groups)  # counts from it: bincount reads its max on CUDA
    sizes = member.sum(dim=1)

    y = unit_rows(patches, FINE_EPS)
    threshold = (keep / _THRESHOLD_SCALE) * _mean_pair_cosine(y)
    # In-group order: the reference's argsort(scores, dim=1, descending=True) of the
    # image's attention row (unstable: equal attentions land where it puts them).
    by_attention = saliency.float()[None].argsort(dim=1, descending=True)[0]
    rank = torch.empty_like(by_attention).scatter_(0, by_attention, torch.arange(num_tokens, device=device))
    priority = num_tokens - rank  # unique, in [1, N]
    # The one host read: the largest group bounds the NMS rounds.
    pick_round = _nms_rounds(group, gram_matrix(y), priority, threshold, num_groups, int(sizes.max()))
    survivors = (member & (pick_round < num_tokens)[None, :]).sum(dim=1)
    quotas = _quotas(sizes, survivors, keep)

    # Rank members: group, then pick round (suppressed share round N), then attention rank.
    order = torch.argsort((group * (num_tokens + 1) + pick_round) * num_tokens + rank)
    start = torch.cumsum(sizes, 0) - sizes
    ordered_group = group[order]
    within = torch.arange(num_tokens, device=device) - start[ordered_group]
    # The members within their quota, kept in `order`: exactly n - 1 of them, so they
    # are compacted into a fixed-size result (a boolean index would read its size).
    chosen = within < quotas[ordered_group]
    slot = torch.where(chosen, torch.cumsum(chosen, dim=0) - 1, keep - 1)  # unchosen: a spare slot
    rows = order.new_zeros(keep).scatter_(0, slot, order + 1)[: keep - 1]
    return torch.cat([rows.new_zeros(1), rows])


def _clipped_shares(weights: Sequence[float], caps: Sequence[int], total: int) -> list[float]:
    """b_i = clamp(lam * w_i, 1, cap_i) with lam chosen so that sum(b) = total.

    Needs w_i > 0 and len(w) <= total <= sum(caps). The sum is continuous,
    non-decreasing and piecewise linear in lam with breakpoints 1 / w_i and
    cap_i / w_i: find the segment by bisection, then solve it exactly.
    """
    def spent(lam: float) -> float:
        return sum(min(max(lam * w, 1.0), c) for w, c in zip(weights, caps))

    points = sorted({p for w, c in zip(weights, caps) for p in (1.0 / w, c / w)})
    index = min(bisect.bisect_left(points, total, key=spent), len(points) - 1)
    high = points[index]
    low = points[index - 1] if index else 0.0
    spent_low, spent_high = spent(low), spent(high)
    if spent_high == spent_low:
        lam = high
    else:
        lam = low + (total - spent_low) * (high - low) / (spent_high - spent_low)
    return [min(max(lam * w, 1.0), c) for w, c in zip(weights, caps)]


def prunesid_dynamic_budgets(patch_features: Sequence[torch.Tensor], average_keep: int) -> list[int]:
    """PruneSID-Dyn budgets: one per image, proportional to phi_i = 1 - rho_i.

    Args:
        patch_features: B tensors [N_i, Dv] of pre-projector patch features.
        average_keep: the mean budget over the B images (>= 1).

    Returns:
        B integers with 1 <= b_i <= N_i summing to T = average_keep * B, clipped
        to [B, sum N_i] when the caps make T unreachable. b_i = clamp(lam * phi_i,
        1, N_i) with lam fitted to T (phi floored at 1e-6, so a fully redundant
        image still scales), then largest-remainder rounding: floors first, the
        missing units to the largest fractional parts (ties -> lower image index).
    """
    average_keep = check_keep(average_keep)
    if not patch_features:
        return []
    caps = [int(f.shape[0]) for f in patch_features]
    if min(caps) < 1:
        raise ValueError("every image needs at least one patch token")
    phi = [1.0 - float(redundancy(f)) for f in patch_features]  # one host sync per image
    total = min(max(average_keep * len(caps), len(caps)), sum(caps))
    shares = _clipped_shares([max(p, _PHI_FLOOR) for p in phi], caps, total)

    budgets = [min(max(math.floor(s), 1), c) for s, c in zip(shares, caps)]
    missing = total - sum(budgets)
    by_remainder = sorted(range(len(caps)), key=lambda i: (budgets[i] - shares[i], i))
    # sum(floor(share)) <= total, so only units are missing; one pass places them,
    # the outer loop only guards against float rounding (total <= sum(caps)).
    while missing > 0:
        for i in by_remainder:
            if missing and budgets[i] < caps[i]:
                budgets[i] += 1
                missing -= 1
    return budgets
