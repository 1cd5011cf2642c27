"""Slow per-step transcriptions of docs/methods.md: one image at a time, a Python loop per
greedy step with a host read per step. They are the oracle the batched methods are tested
against and bench-select's baseline; not used by the engine.

Pure torch (no vLLM import); every score is float32. Every function takes ONE image and,
unless said otherwise, returns a Python ``list[int]`` in pick order. ``1 <= K < N`` is
assumed (the identity / error rules of the public API are not repeated here).

Choices where the specification leaves room (each is named again where it is made):

- Pairwise cosines. Every cosine (or ``1 - cos`` distance) of a method is an entry of ONE
  full Gram matrix ``Y @ Y.T`` of the method's unit rows, indexed afterwards. Products of
  differently shaped sub-matrices (a few rows against the rest, or a matrix-vector
  product) round differently from the full product on CPU (measured with torch 2.13: row
  counts that are not a multiple of 8, and any matrix-vector product, change low bits),
  and an exact-comparison greedy step must see one value per pair.
- Rankings make the call of the specification's table "Ranking calls by method", with its
  flags, on the image's scores as a ``[1, N]`` row (a reference batch of one; for a row,
  torch's CPU sort and topk order exact ties the same alone or inside a batch): PromPrune's
  stage 1 ``topk(largest=True, sorted=False)``, VisPruner's two ``argsort(dim=-1,
  descending=True)``, PruneSID's in-group ``argsort(dim=1, descending=True)`` of the
  attention row, VisionZip's ``topk(k, dim=1)``. Equal values land where that call puts
  them, which for the unstable sort and topk is not ascending index. Those functions take
  ``ranking="stable"``, a diagnostic variant (``torch.sort(descending=True, stable=True)``:
  equal values keep the lower index first) that shows which picks exact ties decide.
  Greedy steps and the controls without a reference call rank as ``torch.argmax``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

Entropy = Literal["spectral", "attention", "feature_norm"]
Coverage = Literal["dpp", "fps", "fl"]

Ranking = Literal["reference", "stable"]

_NEG_INF = float("-inf")
_POS_INF = float("inf")


# --------------------------------------------------------------------------- helpers


def unit_rows_stepwise(rows: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows [N, D] divided by their L2 norm clamped below at `eps` (float32) -> [N, D]."""
    rows = rows.float()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(eps)


def cosine_gram_stepwise(rows: torch.Tensor, eps: float) -> torch.Tensor:
    """Cosine similarity [N, N] of rows [N, D]: the single product ``Y @ Y.T`` of unit rows."""
    unit = unit_rows_stepwise(rows, eps)
    return unit @ unit.T


def _stable_descending(row: torch.Tensor) -> list[int]:
    return torch.sort(row, dim=-1, descending=True, stable=True).indices[0].tolist()


def argsort_descending_stepwise(scores: torch.Tensor, ranking: Ranking = "reference") -> list[int]:
    """Indices of scores [N] from high to low: ``argsort(dim=-1, descending=True)`` (torch's
    default, unstable sort) of the float32 ``[1, N]`` row, or the stable variant."""
    row = scores.float()[None]
    if ranking == "stable":
        return _stable_descending(row)
    return row.argsort(dim=-1, descending=True)[0].tolist()


def topk_stepwise(scores: torch.Tensor, count: int, ranking: Ranking = "reference", *, in_order: bool = True) -> list[int]:
    """The `count` highest of scores [N]: ``torch.topk(row, count, dim=-1, largest=True,
    sorted=in_order)`` of the float32 ``[1, N]`` row in the order it returns them, or the
    first `count` of the stable variant."""
    row = scores.float()[None]
    if ranking == "stable":
        return _stable_descending(row)[:count]
    return torch.topk(row, count, dim=-1, largest=True, sorted=in_order).indices[0].tolist()


def _blocked_mask(num_tokens: int, chosen: Sequence[int]) -> torch.Tensor:
    blocked = torch.zeros(num_tokens, dtype=torch.bool)
    if len(chosen):
        blocked[list(chosen)] = True
    return blocked


def _first_free(blocked: torch.Tensor) -> int:
    """Lowest index that is not blocked."""
    return int(torch.nonzero(~blocked)[0, 0])


# --------------------------------------------------------------------------- coverage stages


def dpp_stepwise(features: torch.Tensor, count: int, chosen: Sequence[int] = ()) -> list[int]:
    """Greedy DPP MAP (Chen, Zhang & Zhou 2018, incremental Cholesky) over the tokens not in `chosen`.

    Args:
        features: [N, D]; the kernel is ``L = Y Y^T`` with ``Y`` the rows L2-normalised (eps 1e-6).
        count: number of picks (exactly this many; no epsilon stop).
        chosen: stage-1 tokens; they are never picked and only decide the first pick.

    First pick: with `chosen` non-empty, the token whose maximum cosine to `chosen` is
    smallest (``torch.argmin``: first index on exact ties); otherwise the lowest free index
    (the structural tie of the all-ones diagonal). Then per step: ``e = (L[j] - c_j^T C) /
    sqrt(max(d2_j, 1e-8))``, ``d2 -= e^2`` clamped at 0, next = ``torch.argmax`` of ``d2``
    over the tokens neither chosen nor picked.

    Returns:
        `count` indices in pick order.
    """
    num_tokens = features.shape[0]
    if count <= 0:
        return []
    kernel = cosine_gram_stepwise(features, 1e-6)
    blocked = _blocked_mask(num_tokens, chosen)
    if len(chosen):
        worst_cover = kernel[:, list(chosen)].max(dim=1).values
        worst_cover = torch.where(blocked, _POS_INF, worst_cover)
        pick = int(torch.argmin(worst_cover))
    else:
        pick = _first_free(blocked)
    gains = torch.diagonal(kernel).clone()  # d_i^2 = L_ii
    cholesky_rows = torch.zeros(count, num_tokens)  # row t: e of the t-th pick
    picks = [pick]
    for step in range(count - 1):
        pivot = torch.sqrt(torch.clamp(gains[pick], min=1e-8))
        projection = cholesky_rows[:step, pick] @ cholesky_rows[:step]  # <c_j, c_i> for every i
        update = (kernel[pick] - projection) / pivot
        cholesky_rows[step] = update
        gains = torch.clamp(gains - update * update, min=0.0)
        blocked[pick] = True
        pick = int(torch.argmax(torch.where(blocked, _NEG_INF, gains)))
        picks.append(pick)
    return picks


def fps_stepwise(features: torch.Tensor, count: int, chosen: Sequence[int] = ()) -> list[int]:
    """Farthest point sampling on cosine distance ``1 - cos`` (rows normalised with eps 1e-6).

    Args:
        features: [N, D].
        count: number of picks.
        chosen: the initial set (stage-1 tokens); never picked.

    First pick: index 0 (lowest free index) when `chosen` is empty, else the token with
    the largest minimum distance to `chosen`; then repeatedly the token with the largest
    minimum distance to every chosen and picked token (``torch.argmax`` semantics).

    Returns:
        `count` indices in pick order.
    """
    num_tokens = features.shape[0]
    if count <= 0:
        return []
    distance = 1.0 - cosine_gram_stepwise(features, 1e-6)
    blocked = _blocked_mask(num_tokens, chosen)
    if len(chosen):
        nearest = distance[:, list(chosen)].min(dim=1).values
        pick = int(torch.argmax(torch.where(blocked, _NEG_INF, nearest)))
        nearest = torch.minimum(nearest, distance[:, pick])
    else:
        pick = _first_free(blocked)
        nearest = distance[:, pick].clone()
    picks = [pick]
    blocked[pick] = True
    for _ in range(count - 1):
        pick = int(torch.argmax(torch.where(blocked, _NEG_INF, nearest)))
        picks.append(pick)
        blocked[pick] = True
        nearest = torch.minimum(nearest, distance[:, pick])
    return picks


def facility_location_stepwise(features: torch.Tensor, count: int, chosen: Sequence[int] = ()) -> list[int]:
    """Greedy facility location on cosine similarity (rows normalised with eps 1e-6).

    Args:
        features: [N, D].
        count: number of picks.
        chosen: stage-1 tokens; never picked; they set the initial cover.

    ``cover_i`` starts at the max similarity of token i to `chosen` (0 when empty);
    ``gain_j = sum_i max(0, sim(i, j) - cover_i)`` with i over ALL N tokens, summed over
    the row axis of ``sim`` (dim 0); pick ``torch.argmax`` of the gain over the free
    tokens; ``cover = max(cover, sim[:, j])``.

    Returns:
        `count` indices in pick order.
    """
    num_tokens = features.shape[0]
    if count <= 0:
        return []
    similarity = cosine_gram_stepwise(features, 1e-6)
    blocked = _blocked_mask(num_tokens, chosen)
    if len(chosen):
        cover = similarity[:, list(chosen)].max(dim=1).values
    else:
        cover = torch.zeros(num_tokens)
    picks = []
    for _ in range(count):
        gain = torch.clamp(similarity - cover[:, None], min=0.0).sum(dim=0)
        pick = int(torch.argmax(torch.where(blocked, _NEG_INF, gain)))
        picks.append(pick)
        blocked[pick] = True
        cover = torch.maximum(cover, similarity[:, pick])
    return picks


_COVERAGE = {"dpp": dpp_stepwise, "fps": fps_stepwise, "fl": facility_location_stepwise}


def coverage_stepwise(features: torch.Tensor, keep: int) -> list[int]:
    """The `coverage` control: DPP over all tokens (empty stage 1) -> `keep` indices in pick order."""
    return dpp_stepwise(features, keep)


# --------------------------------------------------------------------------- PromPrune


def spectral_entropy_stepwise(features: torch.Tensor) -> torch.Tensor:
    """Normalised spectral entropy Hn of features [N, D] -> float32 scalar tensor.

    L2-normalise (eps 1e-8), centre on the mean token, Gram ``Xc Xc^T`` if N <= D else
    ``Xc^T Xc``, ``torch.linalg.eigvalsh``, clamp 1e-12, ``p = lam / sum(lam)``,
    ``-sum(p ln p) / ln(min(N, D))``.
    """
    unit = unit_rows_stepwise(features, 1e-8)
    centred = unit - unit.mean(dim=0, keepdim=True)
    num_tokens, width = centred.shape
    gram = centred @ centred.T if num_tokens <= width else centred.T @ centred
    eigenvalues = torch.linalg.eigvalsh(gram).clamp_min(1e-12)
    p = eigenvalues / eigenvalues.sum()
    return -(p * torch.log(p)).sum() / math.log(min(num_tokens, width))


def attention_entropy_stepwise(saliency: torch.Tensor) -> torch.Tensor:
    """Entropy of saliency [N] renormalised to sum 1 (then clamped at 1e-12), / ln N -> scalar."""
    p = saliency.float()
    p = (p / p.sum()).clamp_min(1e-12)
    return -(p * torch.log(p)).sum() / math.log(saliency.shape[0])


def feature_norm_entropy_stepwise(features: torch.Tensor) -> torch.Tensor:
    """Entropy of the token L2 norms of features [N, D] (clamped at 1e-12, normalised to sum 1), / ln N."""
    norms = features.float().norm(dim=1).clamp_min(1e-12)
    p = norms / norms.sum()
    return -(p * torch.log(p)).sum() / math.log(features.shape[0])


def entropy_stepwise(features: torch.Tensor, saliency: torch.Tensor, entropy: Entropy = "spectral") -> torch.Tensor:
    """The entropy that drives PromPrune's split (see the three functions above)."""
    if entropy == "spectral":
        return spectral_entropy_stepwise(features)
    if entropy == "attention":
        return attention_entropy_stepwise(saliency)
    if entropy == "feature_norm":
        return feature_norm_entropy_stepwise(features)
    raise ValueError(f"unknown entropy {entropy!r}")


def saliency_count_stepwise(
    entropy_value: torch.Tensor,
    keep: int,
    *,
    mu: float = 0.42,
    tau: float = 0.02,
    kr_min: float = 0.0,
    kr_max: float = 1.0,
    fixed_share: float | None = None,
) -> int:
    """K_sal: ``round_half_to_even(r * K)`` in float32, clamped to [0, K].

    ``r = kr_min + (1 - sigmoid(clamp((H - mu) / tau, -20, 20))) * (kr_max - kr_min)``, or
    ``r = fixed_share`` (as a float32 tensor) when given.
    """
    if fixed_share is not None:
        share = torch.tensor(fixed_share, dtype=torch.float32)
    else:
        z = torch.clamp((entropy_value.float() - mu) / tau, -20.0, 20.0)
        share = kr_min + (1.0 - torch.sigmoid(z)) * (kr_max - kr_min)
    count = int(torch.round(share * keep).item())
    return min(max(count, 0), keep)


def promprune_stepwise(
    features: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    *,
    mu: float = 0.42,
    tau: float = 0.02,
    kr_min: float = 0.0,
    kr_max: float = 1.0,
    fixed_share: float | None = None,
    entropy: Entropy = "spectral",
    coverage: Coverage = "dpp",
    ranking: Ranking = "reference",
) -> list[int]:
    """PromPrune for one image.

    Args:
        features: [N, D] projected tokens.
        saliency: [N] CLS attention (head mean).
        keep: K.
        ranking: stage 1's call (module docstring).

    Returns:
        K indices: stage 1 (the K_sal most salient: ``topk(a, K_sal, largest=True,
        sorted=False)``, in the order it returns them) then stage 2 (`coverage` over the
        other tokens) in pick order.
    """
    entropy_value = entropy_stepwise(features, saliency, entropy)
    count = saliency_count_stepwise(
        entropy_value, keep, mu=mu, tau=tau, kr_min=kr_min, kr_max=kr_max, fixed_share=fixed_share
    )
    stage1 = topk_stepwise(saliency, count, ranking, in_order=False)
    stage2 = _COVERAGE[coverage](features, keep - count, stage1)
    return stage1 + stage2


def saliency_stepwise(saliency: torch.Tensor, keep: int) -> list[int]:
    """The `saliency` control (no reference call): `keep` times the ``torch.argmax`` of the
    saliency [N] over the tokens not yet picked (equal values: lower index first)."""
    remaining = saliency.float().clone()
    picks = []
    for _ in range(keep):
        pick = int(torch.argmax(remaining))
        picks.append(pick)
        remaining[pick] = _NEG_INF
    return picks


# --------------------------------------------------------------------------- DivPrune


def divprune_stepwise(features: torch.Tensor, keep: int) -> list[int]:
    """DivPrune max-min diversity on cosine distance ``1 - cos`` (eps 1e-6) of features [N, D].

    First pick: ``torch.argmax`` of each token's nearest-neighbour distance (itself
    excluded); then ``torch.argmax`` of the minimum distance to the picked set over the
    unpicked tokens. Returns `keep` indices in pick order.
    """
    num_tokens = features.shape[0]
    distance = 1.0 - cosine_gram_stepwise(features, 1e-6)
    without_self = distance.clone()
    without_self.fill_diagonal_(_POS_INF)
    pick = int(torch.argmax(without_self.min(dim=1).values))
    picks = [pick]
    blocked = _blocked_mask(num_tokens, picks)
    nearest = distance[:, pick].clone()
    for _ in range(keep - 1):
        pick = int(torch.argmax(torch.where(blocked, _NEG_INF, nearest)))
        picks.append(pick)
        blocked[pick] = True
        nearest = torch.minimum(nearest, distance[:, pick])
    return picks


# --------------------------------------------------------------------------- VisPruner


def vispruner_stepwise(
    pre_features: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    important_ratio: float = 0.5,
    *,
    ranking: Ranking = "reference",
) -> list[int]:
    """VisPruner for one image.

    Args:
        pre_features: [N, Dv] pre-projector tokens (cosines on rows normalised with eps 1e-6).
        saliency: [N] CLS attention (head mean).
        keep: K; ``K_imp = int(K * important_ratio)`` important tokens, ``K_div = K - K_imp``.
        ranking: both orderings (saliency; each round's duplication scores) are the
            reference's ``argsort(dim=-1, descending=True)``; "stable" is the diagnostic
            variant (module docstring).

    The residual list starts as the non-important tokens in descending saliency order.
    Each round: ``r = min(8, R - K_div)`` (stop if r <= 0); evens = slots 0, 2, ... and
    odds = slots 1, 3, ... of the current list; score of an even = max cosine to the odds;
    if there are fewer than r evens all are dropped, else the evens after the r highest
    survive in descending-score order; next list = surviving evens + odds.

    Returns:
        K indices: important (descending saliency) then the final residual list.
    """
    order = argsort_descending_stepwise(saliency, ranking)
    important_count = int(keep * important_ratio)
    diverse_count = keep - important_count
    important = order[:important_count]
    residual = order[important_count:]
    similarity = cosine_gram_stepwise(pre_features, 1e-6)
    while True:
        drop = min(8, len(residual) - diverse_count)
        if drop <= 0:
            break
        evens, odds = residual[0::2], residual[1::2]
        if len(evens) < drop:
            survivors: list[int] = []
        else:
            if odds:
                scores = similarity[torch.tensor(evens)[:, None], torch.tensor(odds)].max(dim=1).values
            else:  # only reachable with K_div = 0 and one residual token
                scores = torch.zeros(len(evens))
            survivors = [evens[slot] for slot in argsort_descending_stepwise(scores, ranking)[drop:]]
        residual = survivors + odds
    return important + residual


# --------------------------------------------------------------------------- VisionZip


def visionzip_plan_stepwise(
    keys: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    dominant_ratio: float = 54 / 64,
    ranking: Ranking = "reference",
) -> tuple[list[int], list[int], dict[int, int]]:
    """VisionZip's plan for one image, in row space (row 0 = CLS, row i + 1 = patch i).

    Args:
        keys: [N + 1, Dk] head-mean layer keys, CLS first.
        saliency: [N] CLS attention (summed over heads).
        keep: K output tokens; ``K_dom = min(K, max(1, round(K * dominant_ratio)))``
            (Python round: half to even), ``K_ctx = K - K_dom``.
        ranking: the dominant patches' call, ``topk(K_dom - 1, dim=1)`` (module docstring).

    Returns:
        (dominant rows ascending: CLS + the K_dom - 1 patches that topk returns; target
        rows ascending: the remaining rows at list positions ``i * max(1, R // K_ctx)``;
        {merged row: target row} for every other remaining row, the target of largest key
        cosine (eps 1e-6), ``torch.argmax`` first on ties).
    """
    num_patches = saliency.shape[0]
    dominant_count = min(keep, max(1, round(keep * dominant_ratio)))
    context_count = keep - dominant_count
    top_patches = topk_stepwise(saliency, dominant_count - 1, ranking)
    dominant = [0] + sorted(patch + 1 for patch in top_patches)
    taken = set(dominant)
    remaining = [row for row in range(1, num_patches + 1) if row not in taken]
    if context_count == 0:
        return dominant, [], {}
    step = max(1, len(remaining) // context_count)
    targets = [remaining[i * step] for i in range(context_count)]
    target_set = set(targets)
    similarity = cosine_gram_stepwise(keys, 1e-6)
    assignment: dict[int, int] = {}
    for row in remaining:
        if row in target_set:
            continue
        best = int(torch.argmax(similarity[row, targets]))
        assignment[row] = targets[best]
    return dominant, targets, assignment


def visionzip_stepwise(
    tokens: torch.Tensor,
    keys: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    dominant_ratio: float = 54 / 64,
) -> torch.Tensor:
    """VisionZip's merged tokens [K, Dv] (float32) for tokens [N + 1, Dv] (CLS first).

    Rows: the dominant rows ascending, then per target (ascending) ``target +
    mean(assigned rows)`` (the mean in float32), or the target alone if nothing joined it.
    """
    tokens = tokens.float()
    dominant, targets, assignment = visionzip_plan_stepwise(keys, saliency, keep, dominant_ratio)
    out = [tokens[row] for row in dominant]
    for target in targets:
        joined = [row for row, chosen in assignment.items() if chosen == target]
        if joined:
            out.append(tokens[target] + tokens[joined].mean(dim=0))
        else:
            out.append(tokens[target].clone())
    return torch.stack(out)


# --------------------------------------------------------------------------- PruneSID


def prunesid_groups_stepwise(patches: torch.Tensor, keep: int) -> torch.Tensor:
    """PSCA grouping of patches [N, Dv] -> group of each token [N] int64 (exact PCA).

    ``S = sigmoid(patches)^T`` [Dv, N], centred over the feature axis (each token's mean
    over the Dv features subtracted), ``torch.linalg.svd(full_matrices=False)``,
    ``V = |Vh[:q]^T|`` with ``q = max(int(n / 4), 1)`` clipped to min(Dv, N); group =
    ``torch.argmax`` over the q columns.

    The transpose is a view (no copy), as "transposed to [Dv, N]" reads in torch, so the
    centring mean sums along the memory-contiguous axis. That summation order is not a
    neutral detail: two singular vectors with close singular values mix under
    last-bit perturbations, and on random clustered images about 1% of cases have a
    token whose top two loadings are that close (seen: 4e-8 and 1.4e-5 apart); a
    contiguous copy before the mean then moves that token to another group.
    """
    num_tokens, width = patches.shape
    components = min(max(int(keep / 4), 1), width, num_tokens)
    samples = torch.sigmoid(patches.float()).T
    centred = samples - samples.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    loadings = vh[:components].T.abs()
    return torch.argmax(loadings, dim=1)


def prunesid_quotas_stepwise(
    sizes: torch.Tensor,
    survivors: torch.Tensor,
    keep: int,
    *,
    top_up: Literal["fill", "round_robin"] = "fill",
) -> torch.Tensor:
    """Tokens per group [G] int64 for group sizes c [G] and survivor counts s [G], summing to n - 1.

    Lower ``min(1, c)``; upper ``min(5 * ceil(n / 64), c, s)`` raised by 1 (capped at c)
    while its sum is below n; spare ``n - 1 - sum(lower)`` shared by cumulative rounding
    of ``torch.cumsum(s / sum(s))`` (float32) times the spare, ``torch.round``,
    differences; add lower, cap at upper; top up in ``torch.argsort(s, descending=True)``
    order. `top_up` "fill" (default): each group in that order takes as many as its upper
    bound allows before the next; "round_robin": a diagnostic variant giving one token per
    group per pass.
    """
    sizes = sizes.long()
    survivors = survivors.long()
    lower = torch.clamp(sizes, max=1)
    upper = torch.minimum(torch.minimum(sizes, survivors), torch.tensor(5 * math.ceil(keep / 64)))
    while int(upper.sum()) < keep:
        upper = torch.minimum(upper + 1, sizes)
    spare = keep - 1 - int(lower.sum())
    shares = survivors.float() / survivors.float().sum()
    running = torch.round(torch.cumsum(shares, dim=0) * spare)
    extra = torch.diff(running, prepend=torch.zeros(1)).long()
    quotas = torch.minimum(lower + extra, upper)
    missing = keep - 1 - int(quotas.sum())
    order = torch.argsort(survivors, descending=True).tolist()
    if top_up == "fill":
        for group in order:
            if missing <= 0:
                break
            add = min(int(upper[group] - quotas[group]), missing)
            quotas[group] += add
            missing -= add
    else:
        while missing > 0:
            for group in order:
                if missing > 0 and quotas[group] < upper[group]:
                    quotas[group] += 1
                    missing -= 1
    return quotas


def prunesid_stepwise(
    tokens: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    *,
    top_up: Literal["fill", "round_robin"] = "fill",
    ranking: Ranking = "reference",
) -> list[int]:
    """PruneSID for one image (exact PCA).

    Args:
        tokens: [N + 1, Dv] pre-projector tokens, CLS first.
        saliency: [N] CLS attention (summed over heads).
        keep: n, counting the CLS token.
        top_up: see `prunesid_quotas_stepwise` ("fill" is this transcription's reading).
        ranking: the in-group order, ``argsort(dim=1, descending=True)`` of the image's
            attention row (module docstring).

    Redundancy ``rho`` = mean of the cosines (rows normalised with eps 1e-8) over pairs
    i < j; ``thr = (n / 32) * rho``. Each group's members, in the in-group order; NMS
    group by group: take the first member in that order that is neither picked nor
    suppressed, suppress the candidates of the group whose cosine to it is > thr; a
    group's ranking is its picks in pick order, then its suppressed members in that order.

    Returns:
        n rows: 0 (CLS), then each group's top quota members as patch index + 1, groups
        in index order.
    """
    patches = tokens[1:].float()
    groups = prunesid_groups_stepwise(patches, keep).tolist()
    by_attention = argsort_descending_stepwise(saliency, ranking)
    components = min(max(int(keep / 4), 1), patches.shape[1], patches.shape[0])
    similarity = cosine_gram_stepwise(patches, 1e-8)
    num_tokens = patches.shape[0]
    pairs = torch.triu_indices(num_tokens, num_tokens, offset=1)
    rho = similarity[pairs[0], pairs[1]].mean()
    threshold = (keep / 32) * rho
    group_orders: list[list[int]] = []
    survivor_counts: list[int] = []
    for group in range(components):
        members = torch.tensor([patch for patch in by_attention if groups[patch] == group], dtype=torch.int64)
        free = torch.ones(len(members), dtype=torch.bool)
        suppressed = torch.zeros(len(members), dtype=torch.bool)
        picked: list[int] = []
        while bool(free.any()):
            slot = _first_free(~free)
            picked.append(int(members[slot]))
            free[slot] = False
            newly = free & (similarity[members[slot], members] > threshold)
            suppressed |= newly
            free &= ~newly
        group_orders.append(picked + members[suppressed].tolist())
        survivor_counts.append(len(picked))
    sizes = torch.tensor([len(order) for order in group_orders], dtype=torch.int64)
    quotas = prunesid_quotas_stepwise(sizes, torch.tensor(survivor_counts, dtype=torch.int64), keep, top_up=top_up)
    rows = [0]
    for order, quota in zip(group_orders, quotas.tolist()):
        rows.extend(patch + 1 for patch in order[:quota])
    return rows


# --------------------------------------------------------------------------- CDPruner


def cdpruner_stepwise(
    features: torch.Tensor,
    instruction: torch.Tensor,
    keep: int,
    relevance_sign: int = 1,
    theta: float | None = None,
) -> list[int]:
    """CDPruner (methods.md "CDPruner") for one image, in the official loop's form.

    Args:
        features: [N, D] visual tokens; instruction: [M, D] instruction embeddings.
        keep: K picks; relevance_sign: 1 or -1; theta: None or in (0, 1).

    Unit rows divide by the plain norm (no eps; an all-zero row stays 0). Relevance
    ``r = sign * mean_m cos``; min-max over this image (constant relevance: r = 1); then
    ``exp(alpha r)`` with theta. ``L[i, j] = (r_i * S[i, j]) * r_j`` with ``S`` the single
    product of the unit rows. Each step: ``j = torch.argmax(d2)`` over unpicked tokens
    (the first step is the argmax of ``diag(L)``), ``e = (L[j] - c_j^T C) / sqrt(max(d2_j,
    1e-8))``, ``d2 = max(d2 - e^2, 0)``, ``d2[j] = -inf``.

    Returns:
        `keep` indices in pick order.
    """

    def unit(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.float()
        norm = rows.norm(dim=1, keepdim=True)
        return rows / torch.where(norm == 0, torch.ones_like(norm), norm)

    visual = unit(features)
    similarity = visual @ visual.T
    relevance = (visual @ unit(instruction).T).mean(dim=1)
    if relevance_sign == -1:
        relevance = -relevance
    low, high = relevance.min(), relevance.max()
    if float(high - low) == 0.0:
        relevance = torch.ones_like(relevance)
    else:
        relevance = (relevance - low + 1e-6) / (high - low)
    if theta is not None:
        relevance = torch.exp(theta / (2.0 * (1.0 - theta)) * relevance)
    num_tokens = features.shape[0]
    kernel = relevance[:, None] * similarity * relevance[None, :]
    gains = torch.diagonal(kernel).clone()
    cholesky_rows = torch.zeros(keep, num_tokens)
    picks: list[int] = []
    for step in range(keep):
        pick = int(torch.argmax(gains))
        picks.append(pick)
        pivot = torch.sqrt(torch.clamp(gains[pick], min=1e-8))
        update = (kernel[pick] - cholesky_rows[:step, pick] @ cholesky_rows[:step]) / pivot
        cholesky_rows[step] = update
        gains = torch.clamp(gains - update * update, min=0.0)
        gains[picks] = _NEG_INF
    return picks
