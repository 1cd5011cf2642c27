"""Per-request pruning settings: parsing, validation, defaults and transport.

A request carries `{"promprune": {"keep": 64, "method": "promprune", ...options}}`
in `mm_processor_kwargs`; `keep` (or `ratio`) may instead be a list with one
budget per image of the request, in prompt order. The server-wide default lives in the model config
(`--hf-overrides '{"promprune": {...}}'`, written by `vllm-promprune serve --keep`)
and is merged key by key under the request's settings. No settings, or neither
`keep` nor `ratio`, means no pruning.

`keep_mode: "adaptive"` makes `keep` an average: each image gets
`K_i = max(1, round(keep * c_i / c_ref))` (at most its N_i tokens), where c_i is the
image's complexity (`complexity`: phi = 1 - rho, or PromPrune's spectral entropy) and
c_ref its calibrated reference (`phi_ref` / `entropy_ref`). c_i is known only after
the vision tower: the engine's processor asks for it in a planning pass and stores
the outcome in `planned` (docs/dynamic-budgets.md). `"method": "prunesid_dyn"` is
PruneSID with `keep_mode: "adaptive"` and `complexity: "phi"` (PruneSID-Dyn).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .methods import METHODS, ORDERS, Order, check_method, parse_options
from .methods.common import describe_validation_error

SETTINGS_KEY = "promprune"
"""Key of the settings dict in `mm_processor_kwargs` and in the model config."""

BudgetMode = Literal["global", "per_crop"]
KeepMode = Literal["fixed", "adaptive"]
Complexity = Literal["phi", "spectral_entropy"]
MAX_KEEP = 2**31 - 1
DYNAMIC_METHODS: Mapping[str, tuple[str, Complexity]] = {"prunesid_dyn": ("prunesid", "phi")}
"""Method names that are a selection method with adaptive budgets: name -> (method, complexity)."""
REFERENCE_NAMES: Mapping[str, str] = {"phi": "phi_ref", "spectral_entropy": "entropy_ref"}
"""The settings field holding each complexity signal's calibrated reference value."""


class PlannedBudget(BaseModel):
    """What the planning pass decided for one adaptive image (set by the engine, never by a client)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    average_keep: int = Field(ge=1, le=MAX_KEEP)
    complexity: float = Field(allow_inf_nan=False, description="the image's measured complexity c_i")
    plan_key: str = Field(description="the image's identity before planning (the worker-side cache key)")


class PruneSettings(BaseModel):
    """Validated pruning settings for one image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: StrictInt | None = Field(
        None, ge=1, le=MAX_KEEP,
        description=f"an integer in [1, {MAX_KEEP}] (visual tokens kept per image) or null (keep all)",
    )
    ratio: float | None = Field(
        None, gt=0.0, le=1.0, strict=True,
        description="a number in (0, 1] (share of each image's tokens kept) or null",
    )
    method: str = Field("promprune", description=f"one of {sorted(METHODS)}")
    order: Order = Field("spatial", description=f"one of {list(ORDERS)}")
    budget_mode: BudgetMode = Field(
        "global",
        description="'global' (one selection over the whole image) or 'per_crop' (budget split "
        "over a multi-crop image's views; the same as global for single-view images)",
    )
    keep_mode: KeepMode = Field(
        "fixed",
        description="'fixed' (every image keeps `keep`) or 'adaptive' (`keep` is the average; each "
        "image's budget scales with its complexity, see docs/dynamic-budgets.md)",
    )
    complexity: Complexity = Field(
        "phi",
        description="the complexity signal of adaptive budgets: 'phi' (1 - mean pairwise cosine of the "
        "patch features, PruneSID-Dyn) or 'spectral_entropy' (PromPrune's normalised spectral entropy)",
    )
    phi_ref: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="a positive number: the median phi of your images (`vllm-promprune calibrate` reports it)",
    )
    entropy_ref: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="a positive number: the median spectral entropy of your images (calibrate's mu)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Validated method options."
    )
    planned: PlannedBudget | None = Field(None, description="set by the engine's planning pass only")

    @model_validator(mode="after")
    def _one_budget(self) -> PruneSettings:
        if self.keep is not None and self.ratio is not None:
            raise ValueError("set either keep or ratio, not both")
        if self.keep_mode == "adaptive" and self.ratio is not None:
            raise ValueError("keep_mode 'adaptive' scales an average keep: set keep, not ratio")
        if self.keep_mode == "adaptive" and self.keep is not None and self.complexity_ref is None:
            name = REFERENCE_NAMES[self.complexity]
            raise ValueError(
                f"keep_mode 'adaptive' with complexity {self.complexity!r} needs {name}, the median "
                f"{self.complexity} of your images: run `vllm-promprune calibrate` and set it in the server "
                "default (the presets carry it) or in the request"
            )
        return self

    @field_validator("order")
    @classmethod
    def _order_of_merging_methods(cls, order: Order, info: ValidationInfo) -> Order:
        method = info.data.get("method")
        if method in METHODS and METHODS[method].merges and order != "spatial":
            raise ValueError(f"method {method!r} merges tokens, so its output order is fixed: use 'spatial'")
        return order

    def check_inputs(self, available: frozenset[str], tower_name: str) -> None:
        """Raise ValueError if the method needs inputs (`TokenBatch` fields) the tower lacks."""
        missing = set(METHODS[self.method].needs) - available
        if self.has_budget and missing:
            usable = sorted(name for name, spec in METHODS.items() if set(spec.needs) <= available)
            raise ValueError(
                f"{SETTINGS_KEY}.method {self.method!r} needs {sorted(missing)}, which "
                f"{tower_name} does not provide; use one of {usable}"
            )

    @property
    def complexity_ref(self) -> float | None:
        """The calibrated reference of this settings' complexity signal."""
        return self.phi_ref if self.complexity == "phi" else self.entropy_ref

    @property
    def needs_plan(self) -> bool:
        """Adaptive settings whose budget the planning pass has not decided yet."""
        return self.keep_mode == "adaptive" and self.keep is not None and self.planned is None

    def planned_for(self, complexity: float, plan_key: str) -> PruneSettings:
        """These adaptive settings with the budget of an image of measured `complexity`:
        keep = max(1, round_half_to_even(keep * complexity / ref)) (clamped to N by `kept_tokens`)."""
        if not self.needs_plan:
            raise ValueError("only adaptive settings without a planned budget can be planned")
        if not math.isfinite(complexity):
            raise ValueError(f"image complexity must be finite, got {complexity}")
        scaled = self.keep * complexity / self.complexity_ref  # may overflow to inf for a tiny ref
        keep = MAX_KEEP if scaled >= MAX_KEEP else max(1, round(scaled))
        planned = PlannedBudget(average_keep=self.keep, complexity=complexity, plan_key=plan_key)
        return self.model_copy(update={"keep": keep, "planned": planned})

    def kept_tokens(self, num_tokens: int) -> int:
        """Number of visual tokens an image of `num_tokens` keeps (= placeholders).

        `ratio` keeps round_half_to_even(ratio * N) tokens, at least 1. Adaptive
        settings have a count only once planned (`planned_for`).
        """
        if self.needs_plan:
            raise ValueError("an adaptive budget is known only after the planning pass (planned_for)")
        if self.ratio is not None:
            return max(1, round(self.ratio * num_tokens))
        return num_tokens if self.keep is None else min(self.keep, num_tokens)

    def placeholders(self, num_content: int, num_stock: int) -> int:
        """Placeholders (= LLM rows) for an image with `num_content` selectable tokens.

        `num_stock` is the unpruned image's placeholder count, which may include
        layout tokens that are not selection candidates (LLaVA-NeXT newlines).
        """
        return self.kept_tokens(num_content) if self.prunes(num_content) else num_stock

    @property
    def has_budget(self) -> bool:
        return self.keep is not None or self.ratio is not None

    @property
    def reads_instruction(self) -> bool:
        """Whether an image with these settings selects by its request's instruction (CDPruner)."""
        return self.has_budget and "instruction" in METHODS[self.method].needs

    def prunes(self, num_tokens: int) -> bool:
        """Whether an image of `num_tokens` keeps fewer; unplanned adaptive settings are taken to prune."""
        return self.needs_plan or self.kept_tokens(num_tokens) < num_tokens

    def reads_saliency(self, num_tokens: int) -> bool:
        """Whether selecting among an image's `num_tokens` tokens reads the tower's saliency:
        it prunes, with a method that needs saliency (`MethodSpec.needs`, whatever the
        options). Known before the tower runs; PromPrune always reads it (its split between
        saliency and coverage is decided from the projected tokens)."""
        return self.prunes(num_tokens) and "saliency" in METHODS[self.method].needs

    def options_model(self) -> BaseModel:
        """The method's validated options object."""
        return METHODS[self.method].options(**self.options)

    def to_tensor(self) -> torch.Tensor:
        """Encode as a uint8 tensor of the settings' JSON (multimodal kwargs cannot carry strings)."""
        return torch.frombuffer(bytearray(self.model_dump_json().encode()), dtype=torch.uint8)


SETTING_NAMES = tuple(name for name in PruneSettings.model_fields if name not in ("options", "planned"))
"""Keys of a settings dict that are settings; every other key is a method option (`planned` is
the engine's, so a client sending it gets an unknown-option error)."""


def parse_settings(
    raw: Mapping[str, object] | None,
    default: Mapping[str, object] | None = None,
    option_defaults: Mapping[str, object] | None = None,
) -> PruneSettings:
    """Validate request settings merged over the server default, key by key.

    A request's `keep` or `ratio` replaces the default's budget (of either kind).
    If the request names a different method than the default, only the default's
    `keep`, `ratio`, `order` and `budget_mode` carry over (its method options do not).

    `option_defaults` are model-family defaults for method options (e.g. mu for
    Qwen2.5-VL) applied when the method accepts them and neither the request
    nor the server default sets them. Raises ValueError naming the bad field.
    """
    for name, value in (("promprune", raw), ("server default promprune", default)):
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{name} settings must be an object, got {type(value).__name__}")
    default, raw = dict(default or {}), dict(raw or {})
    if any(key in raw for key in PER_IMAGE_KEYS):
        # A request's budget, keep or ratio, replaces the default's budget of either kind.
        default = {key: value for key, value in default.items() if key not in PER_IMAGE_KEYS}
    if "method" in raw and raw["method"] != default.get("method", "promprune"):
        # A request that switches method keeps the default budget and order, not
        # options that belong to the default's method.
        default = {key: value for key, value in default.items() if key in SETTING_NAMES}
    merged: dict[str, object] = {**default, **raw}
    if isinstance(merged.get("method"), str) and merged["method"] in DYNAMIC_METHODS:
        merged = _dynamic_method(merged)
    method = check_method(merged.get("method", "promprune"), f"{SETTINGS_KEY}.")
    options = {k: v for k, v in merged.items() if k not in SETTING_NAMES}
    accepted = METHODS[method].options.model_fields
    for name, value in (option_defaults or {}).items():
        if name in accepted:
            options.setdefault(name, value)
    parsed_options = parse_options(method, options, field_prefix=f"{SETTINGS_KEY}.")
    try:
        return PruneSettings(
            keep=merged.get("keep"),
            ratio=merged.get("ratio"),
            method=method,
            order=merged.get("order", "spatial"),
            budget_mode=merged.get("budget_mode", "global"),
            keep_mode=merged.get("keep_mode", "fixed"),
            complexity=merged.get("complexity", "phi"),
            phi_ref=merged.get("phi_ref"),
            entropy_ref=merged.get("entropy_ref"),
            options=parsed_options.model_dump(),
        )
    except ValidationError as error:
        problems = describe_validation_error(error, f"{SETTINGS_KEY}.", PruneSettings)
        raise ValueError(f"invalid {SETTINGS_KEY} settings: {problems}") from None


def _dynamic_method(merged: Mapping[str, object]) -> dict[str, object]:
    """Settings naming a DYNAMIC_METHODS alias, spelled as its method with adaptive budgets."""
    name = merged["method"]
    method, complexity = DYNAMIC_METHODS[name]  # type: ignore[index]
    for key, value in (("keep_mode", "adaptive"), ("complexity", complexity)):
        if merged.get(key, value) != value:
            raise ValueError(
                f"{SETTINGS_KEY}.{key}: method {name!r} is {method!r} with keep_mode 'adaptive' and "
                f"complexity {complexity!r}; got {key} {merged[key]!r}"
            )
    return {**merged, "method": method, "keep_mode": "adaptive", "complexity": complexity}


PER_IMAGE_KEYS = ("keep", "ratio")
"""Settings keys that may hold a list with one value per image."""


def parse_image_settings(
    raw: Mapping[str, object] | None,
    num_images: int,
    default: Mapping[str, object] | None = None,
    option_defaults: Mapping[str, object] | None = None,
) -> list[PruneSettings]:
    """One `PruneSettings` per image: `parse_settings` with list budgets spread over the images."""
    if raw is not None and not isinstance(raw, Mapping):
        return [parse_settings(raw, default, option_defaults)]  # raises the type error
    raw = dict(raw or {})
    check_per_image_lengths(raw, num_images)
    settings = []
    for image in range(num_images):
        image_raw = {key: value[image] if key in PER_IMAGE_KEYS and isinstance(value, list) else value
                     for key, value in raw.items()}
        try:
            settings.append(parse_settings(image_raw, default, option_defaults))
        except ValueError as error:
            per_image = any(isinstance(raw.get(key), list) for key in PER_IMAGE_KEYS)
            raise ValueError(f"image {image}: {error}" if per_image else str(error)) from None
    return settings


def check_per_image_lengths(raw: Mapping[str, object], num_images: int) -> None:
    for key in PER_IMAGE_KEYS:
        value = raw.get(key)
        if isinstance(value, list) and len(value) != num_images:
            raise ValueError(
                f"{SETTINGS_KEY}.{key}: a list needs one value per image in prompt order; "
                f"got {len(value)} values for {num_images} image(s)"
            )


def select_images(raw: Mapping[str, object], images: list[int]) -> dict[str, object]:
    """`raw` with per-image lists cut down to `images` (indices into the full list)."""
    return {key: [value[i] for i in images] if key in PER_IMAGE_KEYS and isinstance(value, list) else value
            for key, value in raw.items()}
