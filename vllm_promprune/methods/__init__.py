"""Pure torch visual-token selection methods (no vLLM import).

`select_tokens` is the single entry point used by the vLLM models, the
transformers reference path and researchers' own code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .common import ORDERS, Order, check_keep, check_order, finish_order
from .dpp import dpp_greedy_map
from .promprune import PromPruneOptions, promprune_select, saliency_budget, spectral_entropy


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _uniform_select(features: torch.Tensor, saliency: torch.Tensor | None, keep: int, options: NoOptions) -> torch.Tensor:
    """Evenly strided positions: floor(i * N / K) for i in 0..K-1."""
    num_tokens = features.shape[0]
    return torch.arange(keep, device=features.device) * num_tokens // keep


def _promprune(features: torch.Tensor, saliency: torch.Tensor | None, keep: int, options: PromPruneOptions) -> torch.Tensor:
    if saliency is None:
        raise ValueError("method 'promprune' needs saliency scores (CLS attention, shape [N])")
    return promprune_select(features, saliency, keep, options)


class MethodSpec:
    """A selection method: its options model and its selection function."""

    def __init__(
        self,
        options: type[BaseModel],
        select: Callable[[torch.Tensor, torch.Tensor | None, int, Any], torch.Tensor],
        needs_saliency: bool,
    ) -> None:
        self.options = options
        self.select = select
        self.needs_saliency = needs_saliency


METHODS: Mapping[str, MethodSpec] = {
    "promprune": MethodSpec(PromPruneOptions, _promprune, needs_saliency=True),
    "uniform": MethodSpec(NoOptions, _uniform_select, needs_saliency=False),
}


def parse_options(method: str, options: Mapping[str, object]) -> BaseModel:
    """Validate `options` for `method`; unknown methods or options raise ValueError."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    try:
        return METHODS[method].options(**options)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}"
            for e in error.errors()
        )
        raise ValueError(f"invalid options for method {method!r}: {problems}") from None


def select_tokens(
    method: str,
    features: torch.Tensor,
    keep: int,
    *,
    saliency: torch.Tensor | None = None,
    pre_features: torch.Tensor | None = None,
    order: Order = "spatial",
    **options: object,
) -> torch.Tensor:
    """Indices of the visual tokens of ONE image to keep.

    Args:
        method: a name in `METHODS`.
        features: [N, D] projected (post-projector) token features.
        keep: K >= 1. K >= N keeps everything (identity, arange(N)).
        saliency: [N] CLS attention per token (needed by saliency methods).
        pre_features: [N, Dv] pre-projector features (needed by some baselines).
        order: "spatial" (default, ascending position) or "selection" (pick order).
        **options: method options, validated (unknown ones are errors).

    Returns:
        [min(K, N)] int64 unique indices on `features.device`.
    """
    keep = check_keep(keep)
    order = check_order(order)
    parsed = parse_options(method, options)
    if features.dim() != 2:
        raise ValueError(f"features must have shape [N, D], got {tuple(features.shape)}")
    num_tokens = features.shape[0]
    if saliency is not None and saliency.shape != (num_tokens,):
        raise ValueError(
            f"saliency must have shape [N]=[{num_tokens}], got {tuple(saliency.shape)}"
        )
    del pre_features  # used by baselines that are not implemented yet
    if keep >= num_tokens:
        return torch.arange(num_tokens, device=features.device)
    picked = METHODS[method].select(features, saliency, keep, parsed)
    return finish_order(picked, order)


__all__ = [
    "METHODS",
    "ORDERS",
    "PromPruneOptions",
    "dpp_greedy_map",
    "parse_options",
    "saliency_budget",
    "select_tokens",
    "spectral_entropy",
]
