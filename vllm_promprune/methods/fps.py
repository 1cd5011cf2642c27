"""Farthest point sampling (greedy max-min) on cosine distance, batched over images.

Each step picks the token whose minimum cosine distance (1 - cos) to the tokens
chosen so far is largest. The k steps run on the tensors' device with no host
synchronisation: the chosen indices stay tensors and are used through
gather/scatter.
"""

from __future__ import annotations

import torch

from .common import COSINE_EPS, check_batch, cosine_matrix, gather_rows


def max_min_picks(
    similarity: torch.Tensor,
    first: torch.Tensor,
    min_distance: torch.Tensor,
    excluded: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Greedy max-min selection from a given first pick.

    Args:
        similarity: [B, N, N] float32 cosine similarity (one GEMM up front: reading a
            row per step is far cheaper than a [B, N, D] product per step).
        first: [B] int64 first pick of each image.
        min_distance: [B, N] float32 cosine distance of each token to the tokens
            chosen before `first` (inf where there are none).
        excluded: [B, N] bool, tokens never to pick (not modified).
        k: picks per image, >= 1.

    Returns:
        [B, k] int64 indices in pick order; column 0 is `first`.
    """
    batch, num_tokens, _ = similarity.shape
    picked = torch.empty(batch, k, dtype=torch.long, device=similarity.device)
    taken = excluded.clone()
    current = first
    for step in range(k):
        picked[:, step] = current
        if step == k - 1:
            break
        index = current[:, None]
        taken.scatter_(1, index, True)
        row = gather_rows(similarity, index).squeeze(1)  # [B, N]
        min_distance = torch.minimum(min_distance, 1.0 - row)
        current = min_distance.masked_fill(taken, float("-inf")).argmax(dim=1)
    return picked


def farthest_point_sampling(
    features: torch.Tensor,
    k: int,
    *,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick `k` tokens per image by farthest point sampling on cosine distance.

    Args:
        features: [B, N, D] token features (any float dtype; math in float32,
            rows L2-normalised with eps 1e-6).
        k: tokens to pick per image, 0 <= k <= N.
        selected: optional [B, N] bool, tokens already chosen by an earlier stage.
            They are never returned and form the initial set: where an image has
            any, its first pick is the unselected token whose minimum distance to
            them is largest. An image without selected tokens starts at index 0.

    Returns:
        [B, k] int64 indices in pick order, distinct within each image. Exactly
        equal distances go to the lowest index (`torch.argmax`). Picks do not depend on k, so a caller needing
        k_b <= k tokens for image b may take the first k_b columns; columns past
        an image's number of unselected tokens are unspecified.
    """
    check_batch(features, k, selected)
    batch, num_tokens, _ = features.shape
    device = features.device
    if k == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)
    similarity = cosine_matrix(features, COSINE_EPS)
    first = torch.zeros(batch, dtype=torch.long, device=device)
    min_distance = torch.full((batch, num_tokens), float("inf"), device=device)
    excluded = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    if selected is not None:
        excluded = selected
        distance = 1.0 - similarity.masked_fill(~selected[:, None, :], -float("inf"))  # inf off the set
        min_distance = distance.amin(dim=2)
        farthest = min_distance.masked_fill(selected, float("-inf")).argmax(dim=1)
        first = torch.where(selected.any(dim=1), farthest, first)
    return max_min_picks(similarity, first, min_distance, excluded, k)
