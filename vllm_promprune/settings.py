"""Per-request pruning settings: parsing, validation, defaults and transport.

A request carries `{"promprune": {"keep": 64, "method": "promprune", ...options}}`
in `mm_processor_kwargs`; `keep` (or `ratio`) may instead be a list with one
budget per image of the request, in prompt order. The server-wide default lives in the model config
(`--hf-overrides '{"promprune": {...}}'`, written by `vllm-promprune serve --keep`)
and is merged key by key under the request's settings. No settings, or neither
`keep` nor `ratio`, means no pruning.
"""

from __future__ import annotations

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
MAX_KEEP = 2**31 - 1


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
    options: dict[str, Any] = Field(
        default_factory=dict, description="Validated method options."
    )

    @model_validator(mode="after")
    def _one_budget(self) -> PruneSettings:
        if self.keep is not None and self.ratio is not None:
            raise ValueError("set either keep or ratio, not both")
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

    def kept_tokens(self, num_tokens: int) -> int:
        """Number of visual tokens an image of `num_tokens` keeps (= placeholders).

        `ratio` keeps round_half_to_even(ratio * N) tokens, at least 1.
        """
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
        return self.kept_tokens(num_tokens) < num_tokens

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


SETTING_NAMES = tuple(name for name in PruneSettings.model_fields if name != "options")
"""Keys of a settings dict that are settings; every other key is a method option."""


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
            options=parsed_options.model_dump(),
        )
    except ValidationError as error:
        problems = describe_validation_error(error, f"{SETTINGS_KEY}.", PruneSettings)
        raise ValueError(f"invalid {SETTINGS_KEY} settings: {problems}") from None


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
