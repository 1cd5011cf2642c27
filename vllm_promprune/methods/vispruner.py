"""VisPruner: important tokens by CLS attention, the rest by iterative duplicate removal.

1. All tokens in descending CLS attention (head mean); the first
   K_imp = int(K * important_ratio) are kept.
2. The other N - K_imp tokens, kept IN THAT SALIENCY ORDER (a list, not a set),
   shrink to K_div = K - K_imp: each round splits the current list into even and
   odd slots, scores every even token by its max cosine to the odd tokens
   (L2-normalised pre-projector features), drops the min(8, R - K_div) highest
   scores and makes the next list [surviving evens in descending score, then the
   odd tokens in their order]. Which tokens meet as pairs depends on that order,
   so it is part of the method (methods.md, VisPruner).
Both rankings are the reference's own call, `argsort(dim=-1, descending=True)`
(torch's default, unstable sort): equal scores land where that call puts them,
not in list order (methods.md, "Ranking calls by method"). Batched == one image
at a time: every row of a round has the same length (the schedule depends only
on N and K, never on values, so no row is padded), and torch sorts each row on
its own: on CPU the order of exact ties in a row depends only on that row's
values (measured: a row alone, in batches of 2-8 rows and as a strided view).
The loop runs on that host schedule without reading tensor values.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from .common import COSINE_EPS, check_keep, cosine_matrix

_MAX_DROP_PER_ROUND = 8


class VisPrunerOptions(BaseModel):
    """VisPruner knobs (default: the reference's 0.5 split)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    important_ratio: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Share of the budget given to the highest-CLS-attention tokens "
        "(K_imp = int(K * ratio)); the rest is chosen by duplicate removal.",
    )


def drop_schedule(remaining: int, target: int) -> list[int]:
    """Tokens dropped in each round to go from `remaining` to `target` tokens.

    A round drops min(8, R - target) even-slot tokens, but never more than the
    ceil(R / 2) even slots that exist (a round with too few evens drops them all).
    """
    rounds = []
    while remaining > target:
        drop = min(_MAX_DROP_PER_ROUND, remaining - target, (remaining + 1) // 2)
        rounds.append(drop)
        remaining -= drop
    return rounds


def _remove_duplicates(similarity: torch.Tensor, residual: torch.Tensor, drop: int) -> torch.Tensor:
    """One round: the residual list [B, R] (R >= 2, token indices in list order) -> [B, R - drop].

    `similarity` [B, N, N] is the cosine matrix of all tokens, computed once: a
    round gathers its even x odd block instead of multiplying features again.
    Evens are ranked by the reference's `argsort(dim=-1, descending=True)` of
    their exact scores (unstable: equal scores land where that sort puts them).
    """
    even = residual[:, 0::2]
    odd = residual[:, 1::2]
    # One gather of the even x odd block [B, E, O], through flat indices into the N x N matrix.
    num_tokens = similarity.shape[-1]
    block = (even[:, :, None] * num_tokens + odd[:, None, :]).flatten(1)
    duplication = similarity.flatten(1).gather(1, block).view(*even.shape, -1).amax(dim=2)
    survivors = duplication.argsort(dim=-1, descending=True)[:, drop:]  # descending-score order
    return torch.cat([even.gather(1, survivors), odd], dim=1)


def vispruner(
    pre_features: torch.Tensor,
    saliency: torch.Tensor,
    k: int,
    options: VisPrunerOptions,
) -> torch.Tensor:
    """VisPruner selection, batched over images.

    Args:
        pre_features: [B, N, Dv] pre-projector features (any float dtype; math in float32).
        saliency: [B, N] CLS attention per token (head mean).
        k: tokens to keep per image, 0 <= k <= N.
        options: the important/diverse split.

    Returns:
        [B, k] int64 distinct indices: the K_imp important tokens in the order of
        `saliency.argsort(dim=-1, descending=True)`, then the K_div diverse ones in
        their final list order. K_imp uses Python's int(k * ratio), as the reference does.
    """
    if pre_features.dim() != 3:
        raise ValueError(f"pre_features must have shape [B, N, Dv], got {tuple(pre_features.shape)}")
    batch, num_tokens, _ = pre_features.shape
    if saliency.shape != (batch, num_tokens):
        raise ValueError(f"saliency must have shape [{batch}, {num_tokens}], got {tuple(saliency.shape)}")
    check_keep(k, num_tokens, name="k")
    k_important = int(k * options.important_ratio)
    k_diverse = k - k_important
    by_saliency = saliency.float().argsort(dim=-1, descending=True).to(pre_features.device)
    important = by_saliency[:, :k_important]
    if k_diverse == 0:
        return important
    residual = by_saliency[:, k_important:]  # saliency order, not positions
    similarity = cosine_matrix(pre_features, COSINE_EPS)
    for drop in drop_schedule(num_tokens - k_important, k_diverse):
        residual = _remove_duplicates(similarity, residual, drop)
    return torch.cat([important, residual], dim=1)
