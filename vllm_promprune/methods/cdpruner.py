"""CDPruner: prompt-conditioned DPP selection (docs/methods.md, "CDPruner").

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs" (2025). The kernel L = diag(r) S diag(r) weighs the cosine
similarity S of the visual tokens by each token's relevance r to the instruction;
greedy MAP with incremental Cholesky picks K tokens (`dpp.dpp_from_kernel`, with
PromPrune's guards). Batched over images, float32 math, no host reads.

Deviations from the official code (each also in docs/methods.md):

- Min-max of the relevance is per image (the reference's spans the whole batch).
- An all-zero token or instruction row has unit row 0 (no NaN): its cosines are 0.
  Every other row is divided by its plain norm (no eps), as the reference.
- An image whose relevance is constant (max == min, where the reference divides by
  0) gets relevance 1 for every token: L = S, a pure diversity DPP.
- The DPP guards of PromPrune's stage 2 (gains clamped at 0, pivot
  sqrt(max(d^2, 1e-8)), picked tokens never re-picked) where the reference gives NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .common import check_keep, gram_matrix
from .dpp import dpp_from_kernel

RELEVANCE_OFFSET = 1e-6  # the reference's `+ 1e-6` in the min-max


class CDPrunerOptions(BaseModel):
    """CDPruner knobs (default: the released code with LM instruction embeddings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    relevance_sign: Literal[1, -1] = Field(
        1,
        description="1 or -1: the relevance is sign * mean cosine to the instruction "
        "(-1 is the official code's sign for CLIP text embeddings).",
    )
    theta: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="None (default, as the released code) or a number strictly between 0 and 1: "
        "relevance r becomes exp(alpha r), alpha = theta / (2 (1 - theta)).",
    )


def plain_unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows [..., N, D] divided by their float32 L2 norm (no eps); all-zero rows stay 0."""
    rows = rows.float()
    norms = rows.norm(dim=-1, keepdim=True)
    return rows / norms.masked_fill(norms == 0, 1.0)


def cdpruner_relevance(
    unit_features: torch.Tensor, instruction: torch.Tensor, options: CDPrunerOptions
) -> torch.Tensor:
    """Per-token relevance [B, N] (min-max per image, then theta) from unit visual rows
    [B, N, D] and instruction embeddings [B, M, D].

    The mean cosine is the reference's (an [N, M] cosine matrix, then its row mean). An
    instruction longer than N tokens computes it in blocks of rows, so that it never holds
    more than the N x N elements of the kernel (what vLLM's memory profile measures).
    """
    unit_instruction = plain_unit_rows(instruction).transpose(1, 2)  # [B, D, M]
    num_tokens, length = unit_features.shape[1], unit_instruction.shape[2]
    rows = num_tokens if length <= num_tokens else max(1, num_tokens * num_tokens // length)
    relevance = torch.cat([(block @ unit_instruction).mean(dim=-1) for block in unit_features.split(rows, dim=1)], dim=1)
    if options.relevance_sign == -1:
        relevance = -relevance
    low = relevance.amin(dim=1, keepdim=True)
    high = relevance.amax(dim=1, keepdim=True)
    spread = high - low
    scaled = (relevance - low + RELEVANCE_OFFSET) / spread.masked_fill(spread == 0, 1.0)
    relevance = torch.where(spread == 0, torch.ones_like(scaled), scaled)
    if options.theta is not None:
        alpha = options.theta / (2.0 * (1.0 - options.theta))
        relevance = torch.exp(alpha * relevance)
    return relevance


def cdpruner_kernel(features: torch.Tensor, instruction: torch.Tensor, options: CDPrunerOptions) -> torch.Tensor:
    """L = diag(r) S diag(r) [B, N, N] (float32) for features [B, N, D], instruction [B, M, D]."""
    unit = plain_unit_rows(features)
    relevance = cdpruner_relevance(unit, instruction, options)
    kernel = gram_matrix(unit)  # S, exactly symmetric
    return kernel.mul_(relevance[:, :, None]).mul_(relevance[:, None, :])


def cdpruner_select(
    features: torch.Tensor, instruction: torch.Tensor, keep: int, options: CDPrunerOptions | None = None
) -> torch.Tensor:
    """CDPruner's K tokens per image.

    Args:
        features: [B, N, D] projected visual tokens (any float dtype; math in float32).
        instruction: [B, M, D] instruction embeddings in the same space, M >= 1 and the
            same for every image of the batch (images with different M run in separate calls).
        keep: K in [0, N].
        options: `CDPrunerOptions` (default: sign 1, no theta).

    Returns:
        [B, K] int64 indices in pick order (the registry sorts them for "spatial").
        First pick: `torch.argmax` of the kernel diagonal r_i^2 S_ii; then each step the
        `torch.argmax` of the residual gains (exact ties: the lowest index).
    """
    options = options or CDPrunerOptions()
    if features.dim() != 3 or instruction.dim() != 3:
        raise ValueError(
            f"features must be [B, N, D] and instruction [B, M, D], got {tuple(features.shape)} "
            f"and {tuple(instruction.shape)}"
        )
    if instruction.shape[0] != features.shape[0] or instruction.shape[2] != features.shape[2] or instruction.shape[1] < 1:
        raise ValueError(
            f"instruction must have shape [B={features.shape[0]}, M >= 1, D={features.shape[2]}], "
            f"got {tuple(instruction.shape)}"
        )
    check_keep(keep, features.shape[1], name="keep")
    kernel = cdpruner_kernel(features, instruction, options)
    first = kernel.diagonal(dim1=1, dim2=2).argmax(dim=1)
    return dpp_from_kernel(kernel, first, keep)
