"""Control selections: evenly strided, seeded random and saliency-only (top CLS attention)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .common import check_keep

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


class RandomOptions(BaseModel):
    """Options of the `random` control."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: StrictInt = Field(
        0, ge=0, le=MAX_SEED,
        description=f"an integer in [0, {MAX_SEED}] (2**63 - 1), the seed of a local CPU generator; "
        "a seed keeps the same positions for every image",
    )


def uniform(num_tokens: int, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Evenly strided positions floor(i * N / k), i = 0..k-1: [k] int64, ascending, distinct."""
    check_keep(k, num_tokens, name="k")
    return torch.arange(k, device=device) * num_tokens // k


def random_tokens(
    num_tokens: int, k: int, seed: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """`k` distinct positions drawn without replacement: [k] int64 in draw order.

    Uses a local CPU generator seeded with `seed` (the global RNG is untouched),
    so the result depends only on (num_tokens, k, seed): the same seed gives the
    same positions whatever the image and whatever the device.
    """
    check_keep(k, num_tokens, name="k")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(num_tokens, generator=generator)[:k].to(device)


def top_saliency(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` highest-saliency tokens of each image: saliency [B, N] -> [B, k] int64.

    Descending saliency with `torch.argmax` semantics (no reference call to
    follow: a control): among equal values the lowest index comes first, by a
    stable sort.
    """
    if saliency.dim() != 2:
        raise ValueError(f"saliency must have shape [B, N], got {tuple(saliency.shape)}")
    check_keep(k, saliency.shape[1], name="k")
    return torch.sort(saliency.float(), dim=1, descending=True, stable=True).indices[:, :k]
