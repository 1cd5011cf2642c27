"""DivPrune (CVPR 2025): greedy max-min diversity on cosine distance, batched over images.

First pick: the token whose nearest-neighbour distance (excluding itself) is
largest. Then repeatedly the token whose minimum distance to the picked set is
largest. Distance = 1 - cos on L2-normalised (eps 1e-6) projected features.
"""

from __future__ import annotations

import torch

from .common import COSINE_EPS, check_batch, cosine_matrix
from .fps import max_min_picks


def divprune(features: torch.Tensor, k: int) -> torch.Tensor:
    """Pick `k` diverse tokens per image (DivPrune's max-min greedy).

    Args:
        features: [B, N, D] projected token features (any float dtype; math in float32).
        k: tokens to pick per image, 0 <= k <= N.

    Returns:
        [B, k] int64 indices in pick order, distinct within each image; exactly
        equal distances go to the lowest index (`torch.argmax`). A single-token image picks index 0.
    """
    check_batch(features, k)
    batch, num_tokens, _ = features.shape
    device = features.device
    if k == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)
    similarity = cosine_matrix(features, COSINE_EPS)
    distance = 1.0 - similarity
    distance.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    first = distance.amin(dim=2).argmax(dim=1)
    del distance
    min_distance = torch.full((batch, num_tokens), float("inf"), device=device)
    excluded = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    return max_min_picks(similarity, first, min_distance, excluded, k)
