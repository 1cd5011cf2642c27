"""Pure torch visual-token selection methods (no vLLM import).

`select_tokens` is the single entry point used by the vLLM models, the
transformers reference path and researchers' own code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .common import ORDERS, Order, check_keep, check_order, describe_validation_error, finish_order
from .dpp import dpp_greedy_map
from .promprune import PromPruneOptions, promprune_select, saliency_budget, spectral_entropy


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenInputs(NamedTuple):
    """What a method may look at for one image."""

    features: torch.Tensor  # [N, D] projected features
    saliency: torch.Tensor | None  # [N] CLS attention
    pre_features: torch.Tensor | None  # [N, Dv] pre-projector features


def _uniform(inputs: TokenInputs, keep: int, options: NoOptions) -> torch.Tensor:
    """Evenly strided positions: floor(i * N / K) for i in 0..K-1."""
    num_tokens = inputs.features.shape[0]
    return torch.arange(keep, device=inputs.features.device) * num_tokens // keep


def _promprune(inputs: TokenInputs, keep: int, options: PromPruneOptions) -> torch.Tensor:
    if inputs.saliency is None:
        raise ValueError("method 'promprune' needs saliency scores (CLS attention, shape [N])")
    return promprune_select(inputs.features, inputs.saliency, keep, options)


@dataclass(frozen=True)
class MethodSpec:
    """A selection method: its options model and its function (returns [K] indices, 1 <= K < N)."""

    options: type[BaseModel]
    select: Callable[[TokenInputs, int, Any], torch.Tensor]


METHODS: Mapping[str, MethodSpec] = {
    "promprune": MethodSpec(PromPruneOptions, _promprune),
    "uniform": MethodSpec(NoOptions, _uniform),
}


def parse_options(method: str, options: Mapping[str, object], field_prefix: str = "") -> BaseModel:
    """Validate `options` for `method`; unknown methods or options raise ValueError.

    Messages name each bad field as `{field_prefix}{name}`.
    """
    if method not in METHODS:
        raise ValueError(f"{field_prefix}method must be one of {sorted(METHODS)}, got {method!r}")
    model = METHODS[method].options
    try:
        return model(**options)
    except ValidationError as error:
        problems = describe_validation_error(error, field_prefix, list(model.model_fields))
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
    if keep >= num_tokens:
        return torch.arange(num_tokens, device=features.device)
    picked = METHODS[method].select(TokenInputs(features, saliency, pre_features), keep, parsed)
    return finish_order(picked, order)


__all__ = [
    "METHODS",
    "ORDERS",
    "PromPruneOptions",
    "TokenInputs",
    "dpp_greedy_map",
    "parse_options",
    "saliency_budget",
    "select_tokens",
    "spectral_entropy",
]
