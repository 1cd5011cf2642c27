"""Pure torch visual-token selection methods (no vLLM import).

One module per method; this module is the registry and the public API:
`select_tokens` / `merge_tokens` for one image (used by researchers and the
transformers reference) and `reduce_tokens` for a batch of images with the same
settings (used by the vLLM models).

Index spaces. Most methods see the N patch tokens and return indices in
[0, N). Methods with `MethodSpec.with_cls` (PruneSID) see the CLS token as row 0
followed by the patches and return indices in [0, N] where 0 is CLS and i + 1
is patch i; the CLS token then becomes one of the K tokens the LLM sees, as in
the method's reference. Methods with `MethodSpec.merges` (VisionZip) build K new
pre-projector vectors instead of selecting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .cdpruner import CDPrunerOptions, cdpruner_select
from .common import ORDERS, Order, check_keep, check_order, describe_validation_error, finish_order
from .controls import RandomOptions, random_tokens, top_saliency, uniform
from .divprune import divprune
from .dpp import dpp_greedy_map
from .facility_location import facility_location
from .fps import farthest_point_sampling
from .promprune import PromPruneOptions, promprune_select, saliency_budget, spectral_entropy
from .prunesid import PruneSIDOptions, prunesid_dynamic_budgets, prunesid_select
from .visionzip import VisionZipOptions, visionzip_merge
from .vispruner import VisPrunerOptions, vispruner


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenBatch(NamedTuple):
    """What a method may look at, for B images of N patch tokens each."""

    features: torch.Tensor | None = None  # [B, N, D] projected (post-projector) patch tokens
    saliency: torch.Tensor | None = None  # [B, N] CLS attention (head mean)
    pre_features: torch.Tensor | None = None  # [B, N, Dv] pre-projector patch tokens
    cls_pre_feature: torch.Tensor | None = None  # [B, Dv] pre-projector CLS token
    keys: torch.Tensor | None = None  # [B, N + 1, Dk] head-mean attention keys, CLS first
    instruction: torch.Tensor | None = None  # [B, M, D] instruction embeddings (same M for the batch)


@dataclass(frozen=True)
class MethodSpec:
    """A method: options model, needed inputs, index space, and its batched function.

    `run(batch, keep, options)` returns [B, K] indices in pick order, or, for
    merging methods, [B, K, Dv] pre-projector vectors. Called with 1 <= K < N.
    """

    options: type[BaseModel]
    run: Callable[[TokenBatch, int, Any], torch.Tensor]
    needs: tuple[str, ...] = ()
    with_cls: bool = False
    merges: bool = False


def _with_cls(batch: TokenBatch) -> torch.Tensor:
    """[B, N + 1, Dv] pre-projector tokens, CLS first."""
    return torch.cat([batch.cls_pre_feature[:, None], batch.pre_features], dim=1)


def _promprune(batch: TokenBatch, keep: int, options: PromPruneOptions) -> torch.Tensor:
    return promprune_select(batch.features, batch.saliency, keep, options)


def _prunesid(batch: TokenBatch, keep: int, options: PruneSIDOptions) -> torch.Tensor:
    # Groups and quotas differ per image, so PruneSID runs image by image.
    tokens = _with_cls(batch)
    return torch.stack([prunesid_select(t, s, keep, options) for t, s in zip(tokens, batch.saliency)])


def _visionzip(batch: TokenBatch, keep: int, options: VisionZipOptions) -> torch.Tensor:
    return visionzip_merge(_with_cls(batch), batch.keys, batch.saliency, keep, options)


def _vispruner(batch: TokenBatch, keep: int, options: VisPrunerOptions) -> torch.Tensor:
    return vispruner(batch.pre_features, batch.saliency, keep, options)


def _cdpruner(batch: TokenBatch, keep: int, options: CDPrunerOptions) -> torch.Tensor:
    return cdpruner_select(batch.features, batch.instruction, keep, options)


def _same_for_every_image(positions: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    return positions.expand(len(batch.features), -1)


_PROJECTED = ("features",)
_SALIENCY = ("saliency",)

METHODS: dict[str, MethodSpec] = {
    "promprune": MethodSpec(PromPruneOptions, _promprune, ("features", "saliency")),
    "prunesid": MethodSpec(
        PruneSIDOptions, _prunesid, ("saliency", "pre_features", "cls_pre_feature"), with_cls=True
    ),
    "divprune": MethodSpec(NoOptions, lambda b, k, o: divprune(b.features, k), _PROJECTED),
    "vispruner": MethodSpec(VisPrunerOptions, _vispruner, ("saliency", "pre_features")),
    "visionzip": MethodSpec(
        VisionZipOptions, _visionzip, ("saliency", "pre_features", "cls_pre_feature", "keys"), merges=True
    ),
    "fps": MethodSpec(NoOptions, lambda b, k, o: farthest_point_sampling(b.features, k), _PROJECTED),
    "facility_location": MethodSpec(NoOptions, lambda b, k, o: facility_location(b.features, k), _PROJECTED),
    "uniform": MethodSpec(
        NoOptions,
        lambda b, k, o: _same_for_every_image(uniform(b.features.shape[1], k, b.features.device), b),
        _PROJECTED,
    ),
    "random": MethodSpec(
        RandomOptions,
        lambda b, k, o: _same_for_every_image(random_tokens(b.features.shape[1], k, o.seed, b.features.device), b),
        _PROJECTED,
    ),
    "saliency": MethodSpec(NoOptions, lambda b, k, o: top_saliency(b.saliency, k), _SALIENCY),
    "coverage": MethodSpec(NoOptions, lambda b, k, o: dpp_greedy_map(b.features, k), _PROJECTED),
    "cdpruner": MethodSpec(CDPrunerOptions, _cdpruner, ("features", "instruction")),
}

def register_method(name: str, spec: MethodSpec) -> None:
    """Add a selection method under `name` (a built-in name cannot be replaced).

    For the engine, register it in a module named by `VLLM_PROMPRUNE_METHODS`, which
    the plugin imports in every vLLM process (see the README, "Custom methods").
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be an identifier, got {name!r}")
    if name in METHODS and METHODS[name] is not spec:
        raise ValueError(f"method {name!r} is already registered")
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"spec must be a MethodSpec, got {type(spec).__name__}")
    METHODS[name] = spec


ENGINE_UNAVAILABLE: Mapping[str, str] = {
    "prunesid_dyn": (
        "PruneSID-Dyn is PruneSID with a budget per image, set from its redundancy: select each "
        "image with 'prunesid' and the budget vllm_promprune.methods.prunesid_dynamic_budgets gives "
        "it; in the engine's settings, 'prunesid_dyn' names that rule (keep is the average budget)"
    ),
}
"""Method names that are no single-image selection, and what to use instead."""


def check_method(method: object, field_prefix: str = "") -> str:
    """Return `method` if it names a method in `METHODS`, else raise ValueError."""
    if isinstance(method, str) and method in ENGINE_UNAVAILABLE:
        raise ValueError(f"{field_prefix}method {method!r} is not available per image: {ENGINE_UNAVAILABLE[method]}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{field_prefix}method must be one of {sorted(METHODS)}, got {method!r}")
    return method


def parse_options(method: str, options: Mapping[str, object], field_prefix: str = "") -> BaseModel:
    """Validate `options` for `method`; unknown methods or options raise ValueError.

    Messages name each bad field as `{field_prefix}{name}`.
    """
    model = METHODS[check_method(method, field_prefix)].options
    try:
        return model(**options)
    except ValidationError as error:
        problems = describe_validation_error(error, field_prefix, model)
        raise ValueError(f"invalid options for method {method!r}: {problems}") from None


def check_inputs(method: str, batch: TokenBatch) -> None:
    """Raise ValueError if `batch` lacks an input `method` needs or has a wrong shape."""
    spec = METHODS[method]
    reference = batch.features if batch.features is not None else batch.pre_features
    size, num_tokens = reference.shape[:2]
    expected = {
        "features": (size, num_tokens),
        "saliency": (size, num_tokens),
        "pre_features": (size, num_tokens),
        "cls_pre_feature": (size,),
        "keys": (size, num_tokens + 1),
        "instruction": (size,),
    }
    for name in spec.needs:
        value = getattr(batch, name)
        if value is None:
            raise ValueError(f"method {method!r} needs {name}")
        if tuple(value.shape[: len(expected[name])]) != expected[name]:
            raise ValueError(
                f"{name} must start with shape {expected[name]} for {num_tokens} tokens per image, "
                f"got {tuple(value.shape)}"
            )


def reduce_tokens(method: str, batch: TokenBatch, keep: int, options: BaseModel, order: Order = "spatial") -> torch.Tensor:
    """Run `method` on a batch of images that share settings (1 <= keep < N).

    Returns [B, K] indices (in the method's index space, see the module doc) in
    `order`, or [B, K, Dv] merged pre-projector vectors for merging methods.
    """
    spec = METHODS[method]
    check_inputs(method, batch)
    result = spec.run(batch, keep, options)
    if spec.merges:
        if order != "spatial":
            raise ValueError(f"method {method!r} merges tokens; its output order is fixed (order='spatial')")
        return result
    return finish_order(result, order)


def select_tokens(
    method: str,
    features: torch.Tensor,
    keep: int,
    *,
    saliency: torch.Tensor | None = None,
    pre_features: torch.Tensor | None = None,
    cls_pre_feature: torch.Tensor | None = None,
    instruction: torch.Tensor | None = None,
    order: Order = "spatial",
    **options: object,
) -> torch.Tensor:
    """Indices of the visual tokens of ONE image to keep.

    Args:
        method: a name in `METHODS` that selects (not `visionzip`: see `merge_tokens`).
        features: [N, D] projected (post-projector) patch tokens.
        keep: K >= 1. K >= N keeps every patch token (identity, arange(N)).
        saliency: [N] CLS attention per patch token (head mean), for saliency methods.
        pre_features: [N, Dv] pre-projector patch tokens (PruneSID, VisPruner).
        cls_pre_feature: [Dv] pre-projector CLS token (PruneSID).
        instruction: [M, D] instruction embeddings in the features' space (CDPruner).
        order: "spatial" (default, ascending position) or "selection" (pick order).
        **options: method options, validated (unknown ones are errors).

    Returns:
        [min(K, N)] int64 unique indices on `features.device`; for `with_cls`
        methods 0 is the CLS token and i + 1 is patch i.
    """
    keep = check_keep(keep)
    order = check_order(order)
    parsed = parse_options(method, options)
    if METHODS[method].merges:
        raise ValueError(f"method {method!r} merges tokens: use merge_tokens")
    if features.dim() != 2:
        raise ValueError(f"features must have shape [N, D], got {tuple(features.shape)}")
    num_tokens = features.shape[0]
    if keep >= num_tokens:  # every patch token, in the method's index space
        return torch.arange(num_tokens, device=features.device) + int(METHODS[method].with_cls)
    singles = (features, saliency, pre_features, cls_pre_feature)
    batch = TokenBatch(*(None if t is None else t[None] for t in singles))
    if instruction is not None:
        if instruction.dim() != 2:
            raise ValueError(f"instruction must have shape [M, D], got {tuple(instruction.shape)}")
        batch = batch._replace(instruction=instruction[None])
    return reduce_tokens(method, batch, keep, parsed, order)[0]


def merge_tokens(
    method: str,
    pre_features: torch.Tensor,
    keep: int,
    *,
    cls_pre_feature: torch.Tensor,
    keys: torch.Tensor,
    saliency: torch.Tensor,
    **options: object,
) -> torch.Tensor:
    """K merged pre-projector tokens of ONE image (VisionZip).

    Args:
        pre_features: [N, Dv] pre-projector patch tokens; cls_pre_feature: [Dv].
        keys: [N + 1, Dk] head-mean attention keys of the saliency layer, CLS first.
        saliency: [N] CLS attention per patch token.

    Returns:
        [min(K, N), Dv]; K >= N returns the patch tokens unchanged.
    """
    keep = check_keep(keep)
    parsed = parse_options(method, options)
    if not METHODS[method].merges:
        raise ValueError(f"method {method!r} selects tokens: use select_tokens")
    if keep >= pre_features.shape[0]:
        return pre_features
    batch = TokenBatch(None, saliency[None], pre_features[None], cls_pre_feature[None], keys[None])
    return reduce_tokens(method, batch, keep, parsed)[0]


__all__ = [
    "CDPrunerOptions",
    "ENGINE_UNAVAILABLE",
    "check_method",
    "METHODS",
    "ORDERS",
    "MethodSpec",
    "NoOptions",
    "PromPruneOptions",
    "TokenBatch",
    "dpp_greedy_map",
    "merge_tokens",
    "parse_options",
    "prunesid_dynamic_budgets",
    "reduce_tokens",
    "register_method",
    "saliency_budget",
    "select_tokens",
    "spectral_entropy",
]
