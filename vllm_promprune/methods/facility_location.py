"""Greedy facility location on cosine similarity, batched over images.

Maximises F(S) = sum_i max_{j in S} sim(i, j), sim = cosine similarity of
L2-normalised (eps 1e-6) rows. Each step adds the candidate with the largest
marginal gain sum_i max(0, sim(i, j) - cover_i). Memory O(B * N * N): the full
similarity matrix plus one scratch buffer of the same size.
"""

from __future__ import annotations

import torch

from .common import COSINE_EPS, check_batch, cosine_matrix


def facility_location(
    features: torch.Tensor,
    k: int,
    *,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick `k` tokens per image by greedy facility location.

    Args:
        features: [B, N, D] token features (any float dtype; math in float32).
        k: tokens to pick per image, 0 <= k <= N.
        selected: optional [B, N] bool, tokens already chosen by an earlier stage;
            never returned. Where an image has any, the coverage of token i starts
            at its max similarity to them (possibly negative).

    Returns:
        [B, k] int64 indices in pick order, distinct within each image. Exactly
        equal gains go to the lowest index (`torch.argmax`). Picks do not depend on k, so a caller needing
        k_b <= k tokens for image b may take the first k_b columns; columns past
        an image's number of unselected tokens are unspecified.

    Without selected tokens the coverage starts at 0 (F of the empty set is 0),
    so negative similarities never contribute: F(S) = sum_i max(0, max_{j in S} sim(i, j)).
    """
    check_batch(features, k, selected)
    batch, num_tokens, _ = features.shape
    device = features.device
    picked = torch.zeros(batch, k, dtype=torch.long, device=device)
    if k == 0:
        return picked
    similarity = cosine_matrix(features, COSINE_EPS)  # sim(i, j) = similarity[:, i, j]
    scratch = torch.empty_like(similarity)
    cover = torch.zeros(batch, num_tokens, device=device)
    taken = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    if selected is not None:
        taken = selected.clone()
        unselected = ~selected[:, None, :]
        nearest = scratch.copy_(similarity).masked_fill_(unselected, float("-inf")).amax(dim=2)
        cover = torch.where(selected.any(dim=1, keepdim=True), nearest, cover)
    for step in range(k):
        # gains[b, j] = sum_i max(0, sim(j, i) - cover[b, i]) (sim is symmetric): a sum
        # along contiguous rows, faster than down the columns.
        gains = torch.sub(similarity, cover[:, None, :], out=scratch).clamp_min_(0.0).sum(dim=2)
        current = gains.masked_fill_(taken, float("-inf")).argmax(dim=1)
        picked[:, step] = current
        index = current[:, None]
        taken.scatter_(1, index, True)
        column = similarity.gather(2, index[:, None, :].expand(-1, num_tokens, 1)).squeeze(2)
        cover = torch.maximum(cover, column)
    return picked
