"""PromPrune: entropy-driven budget split between saliency and coverage.

Seed paper: "Balancing Saliency and Coverage". Specification: methods.md.
1. Normalised entropy Hn of the image (default: spectral entropy of the
   projected features).
2. Saliency share r = kr_min + (1 - sigmoid((Hn - mu) / tau)) * (kr_max - kr_min)
   (or a fixed share), K_sal = round_half_to_even(r * K): low entropy -> more saliency.
3. Stage 1: the K_sal tokens with the highest CLS attention, the set the
   reference's `torch.topk(a, K_sal, largest=True, sorted=False)` returns.
4. Stage 2: K - K_sal tokens by a coverage method over the remaining tokens
   (default: greedy DPP MAP, first pick = the token least covered by stage 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .common import FINE_EPS, cosine_matrix, gram_matrix, row_norms, unit_rows
from .dpp import dpp_from_kernel, dpp_greedy_map, dpp_kernel, structural_first_pick
from .facility_location import facility_location
from .fps import farthest_point_sampling

CLIP_MU = 0.42
QWEN2_5_VL_MU = 0.5744

_EIGEN_FLOOR = 1e-12
_LOGIT_CLAMP = 20.0
_BOUND_MARGIN = 1e-4
_MIN_TAU = 1e-6

COVERAGE_STAGES = {"dpp": dpp_greedy_map, "fps": farthest_point_sampling, "fl": facility_location}


class PromPruneOptions(BaseModel):
    """PromPrune knobs (defaults: the paper's CLIP-tower values) and its ablations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mu: float = Field(
        CLIP_MU, ge=0.0, le=1.0,
        description=f"Entropy midpoint of the sigmoid split ({CLIP_MU} CLIP, {QWEN2_5_VL_MU} Qwen2.5-VL).",
    )
    tau: float = Field(
        0.02, ge=_MIN_TAU,
        description=f"Temperature of the sigmoid split, at least {_MIN_TAU} "
        "(smaller values underflow in float32 and make the split undefined).",
    )
    kr_min: float = Field(0.0, ge=0.0, le=1.0, description="Lowest saliency share.")
    kr_max: float = Field(1.0, ge=0.0, le=1.0, description="Highest saliency share.")
    fixed_share: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Ablation: a constant saliency share instead of the sigmoid mapping.",
    )
    entropy: Literal["spectral", "attention", "feature_norm"] = Field(
        "spectral", description="Ablation: which entropy drives the split."
    )
    coverage: Literal["dpp", "fps", "fl"] = Field(
        "dpp", description="Ablation: coverage stage (DPP, farthest point sampling, facility location)."
    )

    @model_validator(mode="after")
    def _share_bounds_ordered(self) -> PromPruneOptions:
        if self.kr_min > self.kr_max:
            raise ValueError(f"kr_min ({self.kr_min}) must not exceed kr_max ({self.kr_max})")
        return self


def centred_gram(features: torch.Tensor, cosine: torch.Tensor | None = None) -> torch.Tensor:
    """The smaller Gram matrix of L2-normalised, centred tokens: features [..., N, D].

    N x N (Xc Xc^T) if N <= D, else D x D (Xc^T Xc); both have the same nonzero
    spectrum. If `cosine` [..., N, N] (Y Y^T of the eps-1e-8 unit rows) is given
    and N <= D, the N x N Gram is obtained from it by double centring in O(N^2)
    instead of another O(N^2 D) product.
    """
    num_tokens, width = features.shape[-2:]
    if num_tokens <= width and cosine is not None:
        row_means = cosine.mean(dim=-1, keepdim=True)
        gram = cosine - row_means  # in place from here: the N x N passes dominate at large N
        gram -= row_means.transpose(-1, -2)
        gram += row_means.mean(dim=-2, keepdim=True)
        return gram
    x = unit_rows(features, FINE_EPS)
    x = x - x.mean(dim=-2, keepdim=True)
    return gram_matrix(x if num_tokens <= width else x.transpose(-1, -2))


def spectral_entropy(features: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised spectral entropy Hn in [0, 1] of token features [..., N, D], N >= 2.

    Tokens are L2-normalised and centred; the eigenvalues of the smaller Gram
    matrix (see `centred_gram`, or pass it) form the spectrum, clamped at 1e-12.
    Returns float32 [...].
    """
    num_tokens, width = features.shape[-2:]
    if num_tokens < 2:
        raise ValueError("spectral_entropy needs at least 2 tokens")
    return gram_spectral_entropy(centred_gram(features) if gram is None else gram, min(num_tokens, width))


def gram_spectral_entropy(gram: torch.Tensor, support: int) -> torch.Tensor:
    """Normalised spectral entropy [...] of centred Grams [..., n, n]: entropy of the
    eigenvalues (clamped at 1e-12) as a distribution / ln(support)."""
    return _normalised_entropy(torch.linalg.eigvalsh(gram).clamp_min(_EIGEN_FLOOR), support)


def spectral_entropy_lower_bound(gram: torch.Tensor, support: int) -> torch.Tensor:
    """A lower bound on the normalised spectral entropy, from the Gram alone in O(n^2).

    Shannon entropy is at least the Renyi-2 entropy -ln(sum p_i^2), and
    sum p_i^2 = ||G||_F^2 / tr(G)^2 needs no eigenvalues. A margin of 1e-4 covers
    float32 rounding of the two sums. Returns [...].
    """
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    collision = gram.square().sum(dim=(-2, -1)) / trace.square()
    return (-collision.log() / math.log(support) - _BOUND_MARGIN).clamp(0.0, 1.0)


def attention_entropy(saliency: torch.Tensor) -> torch.Tensor:
    """Entropy of the CLS attention [..., N] (renormalised to a distribution) / ln N."""
    return _normalised_entropy(saliency.float().clamp_min(_EIGEN_FLOOR), saliency.shape[-1])


def feature_norm_entropy(features: torch.Tensor) -> torch.Tensor:
    """Entropy of the token L2 norms [..., N] (normalised to a distribution) / ln N."""
    norms = features.float().norm(dim=-1).clamp_min(_EIGEN_FLOOR)
    return _normalised_entropy(norms, features.shape[-2])


def _normalised_entropy(mass: torch.Tensor, support: int) -> torch.Tensor:
    p = mass / mass.sum(dim=-1, keepdim=True)
    return -(p * p.log()).sum(dim=-1) / math.log(support)


def saliency_budgets(normalised_entropy: torch.Tensor, keep: int, options: PromPruneOptions) -> torch.Tensor:
    """K_sal per image [...] (int64): how many of `keep` tokens stage 1 takes (float32 math)."""
    if options.fixed_share is not None:
        share = torch.full_like(normalised_entropy.float(), options.fixed_share)
    else:
        z = ((normalised_entropy.float() - options.mu) / options.tau).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
        share = options.kr_min + (1.0 - torch.sigmoid(z)) * (options.kr_max - options.kr_min)
    return torch.round(share * keep).clamp(0, keep).long()  # torch.round: half to even


def saliency_budget(normalised_entropy: torch.Tensor, keep: int, options: PromPruneOptions) -> int:
    """K_sal for one image (0-d entropy)."""
    return int(saliency_budgets(normalised_entropy, keep, options).item())


def stage_one_budgets(
    features: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    options: PromPruneOptions,
    cosine: torch.Tensor | None = None,
) -> torch.Tensor:
    """K_sal per image [B] for features [B, N, D] and saliency [B, N].

    With the spectral entropy, the eigendecomposition is skipped for an image
    whose split is already decided: if every entropy between a cheap lower bound
    and 1 gives the same K_sal, that is the K_sal the exact entropy gives
    (the sigmoid split is monotonic). This typically covers images whose entropy
    is far above mu; the others get the exact eigenvalues.
    """
    if options.fixed_share is not None:
        return saliency_budgets(torch.zeros(len(features), device=features.device), keep, options)
    if options.entropy == "attention":
        return saliency_budgets(attention_entropy(saliency), keep, options)
    if options.entropy == "feature_norm":
        return saliency_budgets(feature_norm_entropy(features), keep, options)
    support = min(features.shape[-2:])
    gram = centred_gram(features, cosine)
    at_bound = saliency_budgets(spectral_entropy_lower_bound(gram, support), keep, options)
    at_top = saliency_budgets(torch.ones_like(at_bound, dtype=torch.float32), keep, options)
    undecided = (at_bound != at_top).nonzero().flatten()  # one host sync per batch
    budgets = at_bound.clone()
    if len(undecided):
        grams = gram if len(undecided) == len(gram) else gram[undecided]  # no copy when all need it
        budgets[undecided] = saliency_budgets(gram_spectral_entropy(grams, support), keep, options)
    return budgets


def stage_one_tokens(saliency: torch.Tensor, k_sal: Sequence[int], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 picks [B, keep] int64 (first K_sal columns of each image, 0 after) and mask [B, N].

    Each image's picks are the reference's call on its own saliency row,
    `torch.topk(a, K_sal, dim=-1, largest=True, sorted=False)`, in the order it
    returns them: equal saliencies at the K_sal boundary go where topk puts them.
    K_sal (`k_sal`, per image, read to the host by the caller) differs per image and
    topk takes one k, so this runs image by image.
    """
    batch, num_tokens = saliency.shape
    picks = torch.zeros(batch, keep, dtype=torch.long, device=saliency.device)
    salient = torch.zeros(batch, num_tokens, dtype=torch.bool, device=saliency.device)
    for image, count in enumerate(k_sal):
        top = torch.topk(saliency[image].float(), count, dim=-1, largest=True, sorted=False).indices
        picks[image, :count] = top
        salient[image, top] = True
    return picks, salient


def promprune_select(
    features: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    options: PromPruneOptions,
) -> torch.Tensor:
    """PromPrune selection, batched over images.

    Args:
        features: [B, N, D] projected (post-projector) token features.
        saliency: [B, N] CLS attention per token (head mean).
        keep: K, 1 <= K < N.
        options: split knobs and ablations.

    Returns:
        [B, K] int64 indices in pick order: stage-1 tokens in the order topk
        returns them (`stage_one_tokens`), then stage-2 tokens in coverage pick order.
    """
    batch = features.shape[0]
    # One product serves both the spectral Gram and (rescaled in place once the Gram is
    # built) the DPP kernel; one pass of norms serves the unit rows, the kernel and the
    # DPP's first pick.
    cosine = norms = None
    if (options.fixed_share is None and options.entropy == "spectral") or options.coverage == "dpp":
        norms = row_norms(features)
        cosine = cosine_matrix(features, FINE_EPS, norms)
    k_sal = stage_one_budgets(features, saliency, keep, options, cosine)  # [B]
    counts = k_sal.tolist()  # the one host read of the stage split, before any greedy loop
    stage_one, salient = stage_one_tokens(saliency, counts, keep)  # [B, K], [B, N] stage-1 mask
    # Greedy coverage picks do not depend on how many are taken: run the largest
    # stage 2 once for the whole batch and keep each image's first K - K_sal picks.
    steps = keep - min(counts)
    if options.coverage == "dpp":
        coverage = dpp_from_kernel(dpp_kernel(features, cosine, norms), structural_first_pick(norms), steps, selected=salient)
    else:
        coverage = COVERAGE_STAGES[options.coverage](features, steps, selected=salient)
    step = torch.arange(keep, device=features.device)[None, :]
    stage_two = torch.cat([coverage, coverage.new_zeros(batch, keep)], dim=1)
    stage_two = stage_two.gather(1, (step - k_sal[:, None]).clamp_min(0))
    return torch.where(step < k_sal[:, None], stage_one, stage_two)
