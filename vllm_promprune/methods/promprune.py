"""PromPrune: spectral-entropy budget split between saliency and DPP coverage.

Seed paper: "Balancing Saliency and Coverage". Specification: methods.md.
1. Normalised spectral entropy Hn of the projected features.
2. Saliency share r = kr_min + (1 - sigmoid((Hn - mu) / tau)) * (kr_max - kr_min),
   K_sal = round_half_to_even(r * K); low entropy -> more saliency tokens.
3. Stage 1: the K_sal tokens with the highest CLS attention.
4. Stage 2: greedy DPP MAP over the remaining tokens for K - K_sal tokens,
   starting from the token least covered by stage 1.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .common import descending_stable, unit_rows
from .dpp import dpp_greedy_map

CLIP_MU = 0.42
QWEN2_5_VL_MU = 0.5744

_NORM_EPS = 1e-8
_EIGEN_FLOOR = 1e-12
_LOGIT_CLAMP = 20.0


class PromPruneOptions(BaseModel):
    """Budget-split knobs of PromPrune (defaults: the paper's CLIP-tower values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mu: float = Field(
        CLIP_MU,
        ge=0.0,
        le=1.0,
        description="Entropy midpoint of the sigmoid split (0.42 CLIP, 0.5744 Qwen2.5-VL).",
    )
    tau: float = Field(0.02, gt=0.0, description="Temperature of the sigmoid split.")
    kr_min: float = Field(0.0, ge=0.0, le=1.0, description="Lowest saliency share.")
    kr_max: float = Field(1.0, ge=0.0, le=1.0, description="Highest saliency share.")

    @model_validator(mode="after")
    def _share_bounds_ordered(self) -> PromPruneOptions:
        if self.kr_min > self.kr_max:
            raise ValueError(
                f"kr_min ({self.kr_min}) must not exceed kr_max ({self.kr_max})"
            )
        return self


def spectral_entropy(features: torch.Tensor) -> torch.Tensor:
    """Normalised spectral entropy Hn in [0, 1] of token features [N, D], N >= 2.

    Tokens are L2-normalised and centred; the eigenvalues of the smaller Gram
    matrix (N x N if N <= D, else D x D) form the spectrum. Returns a float32 0-d tensor.
    """
    num_tokens, width = features.shape
    if num_tokens < 2:
        raise ValueError("spectral_entropy needs at least 2 tokens")
    x = unit_rows(features, _NORM_EPS)
    x = x - x.mean(dim=0, keepdim=True)
    gram = x @ x.T if num_tokens <= width else x.T @ x
    eigenvalues = torch.linalg.eigvalsh(gram).clamp_min(_EIGEN_FLOOR)
    p = eigenvalues / eigenvalues.sum()
    entropy = -(p * p.log()).sum()
    return entropy / math.log(min(num_tokens, width))


def saliency_budget(normalised_entropy: torch.Tensor, keep: int, options: PromPruneOptions) -> int:
    """K_sal: how many of `keep` tokens stage 1 takes by saliency (float32 math)."""
    z = ((normalised_entropy.float() - options.mu) / options.tau).clamp(
        -_LOGIT_CLAMP, _LOGIT_CLAMP
    )
    share = options.kr_min + (1.0 - torch.sigmoid(z)) * (options.kr_max - options.kr_min)
    k_sal = torch.round(share * keep)  # torch.round rounds half to even
    return int(k_sal.clamp(0, keep).item())


def promprune_select(
    features: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    options: PromPruneOptions,
) -> torch.Tensor:
    """PromPrune selection for one image.

    Args:
        features: [N, D] projected (post-projector) token features.
        saliency: [N] CLS attention per token (head mean).
        keep: K, 1 <= K < N.
        options: budget-split knobs.

    Returns:
        [K] int64 indices in pick order: stage-1 tokens by descending saliency,
        then stage-2 tokens in DPP pick order.
    """
    k_sal = saliency_budget(spectral_entropy(features), keep, options)
    by_saliency = descending_stable(saliency)
    salient = by_saliency[:k_sal]
    remaining = torch.sort(by_saliency[k_sal:]).values  # ascending position: ties -> first
    diverse = remaining[
        dpp_greedy_map(features[remaining], keep - k_sal, covered_by=features[salient])
    ]
    return torch.cat([salient, diverse])
