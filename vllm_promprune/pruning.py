"""Apply per-image settings to a batch of vision-tower outputs (no vLLM import).

Shared by the vLLM models and the transformers reference, so both turn tower
outputs into the LLM's image embeddings the same way: images with identical
settings run as one batch through the method; each image returns exactly
`settings.kept_tokens(N)` rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .methods import METHODS, TokenBatch, reduce_tokens
from .methods.controls import uniform
from .methods.promprune import spectral_entropy
from .methods.prunesid import redundancy
from .settings import PruneSettings

CLS_TOWER_INPUTS: frozenset[str] = frozenset(TokenBatch._fields)
"""A tower with a CLS token and saliency-layer keys (CLIP) provides every `TokenBatch` input
(the instruction embeddings come from the language model's embedding table)."""
CLS_TOWER_NAME = "this model's vision tower"

PLACEHOLDER_CONFIG_KEYS = ("image_token_index", "image_token_id", "video_token_id", "vision_start_token_id",
                           "vision_end_token_id")
"""Config attributes naming image/video placeholder and delimiter tokens (not instruction text)."""


def non_instruction_ids(tokenizer: Any, config: Any) -> frozenset[int]:
    """Token ids that are not instruction text: the tokenizer's special tokens (BOS/EOS, and
    added special tokens such as Qwen's chat markers <|im_start|>) and the config's
    image/video placeholder and delimiter tokens (`PLACEHOLDER_CONFIG_KEYS`)."""
    excluded = set(tokenizer.all_special_ids)
    excluded |= {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    excluded |= {getattr(config, key) for key in PLACEHOLDER_CONFIG_KEYS if getattr(config, key, None) is not None}
    return frozenset(excluded)


def instruction_tokens(prompt: Sequence[int], excluded: frozenset[int]) -> list[int]:
    """A request's instruction for CDPruner: its prompt token ids without `excluded`
    (`non_instruction_ids`), in prompt order. Chat-template text that is not a special
    token stays (LLaVA-1.5's "USER:" / "ASSISTANT:", Qwen's role names and system prompt);
    in a multi-turn chat, every turn's text (the assistant's too) is part of it."""
    return [token for token in prompt if token not in excluded]


def image_complexity(signal: str, patches: torch.Tensor, projected: Callable[[], torch.Tensor]) -> float:
    """An image's complexity c_i for adaptive budgets, in float32 whatever the tower's dtype.

    `patches` [N, Dv] are its pre-projector patch features; `projected()` gives its LLM
    embeddings [N, D]. 'phi' = 1 - rho (mean pairwise cosine of the patches, PruneSID-Dyn);
    'spectral_entropy' = PromPrune's normalised spectral entropy of the projected tokens
    (0 for a single token). One host read: it runs in the planning pass, once per image.
    """
    if signal == "phi":
        return float(1.0 - redundancy(patches.float()))
    if patches.shape[0] < 2:
        return 0.0
    return float(spectral_entropy(projected().float()))


@dataclass
class PlanningPass:
    """The engine's planning pass over one image: its identity before planning (the plan
    key its budget and rows are stored under) and the settings the pass decided."""

    plan_key: str
    planned: list[PruneSettings] = field(default_factory=list)


PLANNING_PASS: ContextVar[PlanningPass | None] = ContextVar("promprune_planning_pass", default=None)
"""Set by the engine's planning pass while it runs an image through its family's embedding."""


def plan_budgets(
    settings: Sequence[PruneSettings], patches: torch.Tensor, projected: Callable[[], torch.Tensor]
) -> list[PruneSettings]:
    """`settings` with every unplanned adaptive budget decided from its image's complexity.

    `patches` [B, N, Dv] and `projected()` [B, N, D] are the images' tokens. Only the
    engine's planning pass (`PLANNING_PASS`) may meet unplanned settings: anywhere else
    their placeholder count would be unknown, so that raises AssertionError.
    """
    if not any(image_settings.needs_plan for image_settings in settings):
        return list(settings)
    current = PLANNING_PASS.get()
    if current is None:
        raise AssertionError("adaptive settings reached selection without a planning pass")
    cached: list[torch.Tensor] = []

    def projected_once() -> torch.Tensor:
        if not cached:
            cached.append(projected())
        return cached[0]

    planned = []
    for image, image_settings in enumerate(settings):
        if image_settings.needs_plan:
            value = image_complexity(image_settings.complexity, patches[image], lambda image=image: projected_once()[image])
            image_settings = image_settings.planned_for(value, current.plan_key)
            current.planned.append(image_settings)
        planned.append(image_settings)
    return planned


SelectionFailureHandler = Callable[[PruneSettings, int, BaseException], None]
"""`on_failure(settings, num_images, error)`: told when a group's selection raised."""


@dataclass(frozen=True)
class TowerOutput:
    """Vision-tower outputs for B images of N patch tokens."""

    hidden: torch.Tensor  # [B, N + 1, Dv] selected-layer hidden states, CLS first
    saliency: torch.Tensor | None  # [B, N] CLS attention of the saliency layer (head mean, float32); None: not computed
    keys: torch.Tensor | None  # [B, N + 1, Dk] head-mean keys of that layer (None: tower has none to offer)
    features: torch.Tensor | None = None  # [B, N, D] the projected patches, if the tower already has them

    def rows(self, start: int, stop: int) -> TowerOutput:
        """Images start..stop-1."""
        return TowerOutput(*(None if t is None else t[start:stop] for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.hidden, self.saliency, self.keys, self.features

    @staticmethod
    def cat(parts: Sequence[TowerOutput]) -> TowerOutput:
        """Concatenate over images (each optional field present in all parts or in none)."""
        columns = list(zip(*(part._fields() for part in parts)))
        for name, column in zip(("saliency", "keys", "features"), columns[1:]):
            if len({t is None for t in column}) > 1:
                raise ValueError(f"cannot concatenate tower outputs with and without {name}")
        return TowerOutput(*(None if column[0] is None else torch.cat(column) for column in columns))


class PrunedImage(NamedTuple):
    rows: torch.Tensor  # [K, D] LLM embeddings
    kept: torch.Tensor | None  # [K] patch index of each row; None when rows are merged or include CLS


Instructions = Sequence[torch.Tensor | None]
"""Per image: its instruction embeddings [M, D] (CDPruner), or None where the method reads none."""


def prune_images(
    tower: TowerOutput,
    settings: Sequence[PruneSettings],
    project: Callable[[torch.Tensor], torch.Tensor],
    on_selection: Callable[[str, float], None] | None = None,
    on_failure: SelectionFailureHandler | None = None,
    instructions: Instructions | None = None,
) -> list[torch.Tensor]:
    """Image embeddings for the LLM, one [K_b, D] tensor per image (see `prune_images_indexed`)."""
    pruned = prune_images_indexed(tower, settings, project, on_selection, on_failure, instructions)
    return [image.rows for image in pruned]


def prune_towers_indexed(
    towers: Sequence[TowerOutput],
    settings: Sequence[PruneSettings],
    project: Callable[[torch.Tensor], torch.Tensor],
    on_selection: Callable[[str, float], None] | None = None,
    on_failure: SelectionFailureHandler | None = None,
    instructions: Instructions | None = None,
) -> list[PrunedImage]:
    """`prune_images_indexed` for images whose token counts differ (Qwen-VL: one
    `TowerOutput` per image size): towers with the same N are concatenated, so their
    images select as one batch per settings group.

    `settings` has one entry per image, in the order of the towers' images; the result
    too (one `PrunedImage` per image, equal to a call on that image alone).
    """
    first_image = [0]  # index of each tower's first image
    # Towers of one N concatenate, those without saliency or features apart from those with
    # them (a tower computes saliency for the settings of its images: no settings group splits).
    by_kind: dict[tuple[int, bool, bool], list[int]] = {}  # (N, no saliency, no features) -> towers
    for tower_index, tower in enumerate(towers):
        first_image.append(first_image[-1] + tower.hidden.shape[0])
        kind = (tower.hidden.shape[1], tower.saliency is None, tower.features is None)
        by_kind.setdefault(kind, []).append(tower_index)
    if first_image[-1] != len(settings):
        raise ValueError(f"{len(settings)} settings for {first_image[-1]} images")

    results: list[PrunedImage | None] = [None] * len(settings)
    for members in by_kind.values():
        images = [image for t in members for image in range(first_image[t], first_image[t + 1])]
        merged = TowerOutput.cat([towers[t] for t in members])
        pruned = prune_images_indexed(
            merged, [settings[image] for image in images], project, on_selection, on_failure,
            None if instructions is None else [instructions[image] for image in images],
        )
        for image, result in zip(images, pruned):
            results[image] = result
    return results  # type: ignore[return-value]


def prune_images_indexed(
    tower: TowerOutput,
    settings: Sequence[PruneSettings],
    project: Callable[[torch.Tensor], torch.Tensor],
    on_selection: Callable[[str, float], None] | None = None,
    on_failure: SelectionFailureHandler | None = None,
    instructions: Instructions | None = None,
) -> list[PrunedImage]:
    """Image embeddings for the LLM, with the patch index of every row.

    `project` maps pre-projector tokens [..., Dv] to LLM embeddings [..., D]; the
    patches are projected here unless the tower gives `features`. Unpruned images get
    all N projected patch tokens. `on_selection(method, seconds)` is told the host wall
    time of each batched selection. A method that reads saliency meeting a tower
    without it raises AssertionError (the tower was given the wrong settings).

    Without `on_failure`, an exception in a selection propagates (library and
    reference use). With it (the engine), a group of images whose selection
    raises gets the last-resort fallback instead: K evenly strided patch tokens
    (the `uniform` control), so every image still returns exactly its K rows and
    the other groups are untouched; `on_failure` is told the settings, the
    number of images and the error.

    `instructions` gives each image its instruction embeddings [M_i, D] for methods that
    read one (CDPruner); images of a settings group select as one batch when their M_i agree.
    """
    patches = tower.hidden[:, 1:]
    projected = project(patches) if tower.features is None else tower.features  # [B, N, D]
    num_tokens = patches.shape[1]
    settings = plan_budgets(settings, patches, lambda: projected)
    rows: list[PrunedImage | None] = [None] * len(settings)
    groups: dict[tuple[str, int | None], list[int]] = {}  # (settings, instruction length) -> images
    for image, image_settings in enumerate(settings):
        if image_settings.prunes(num_tokens):
            instruction = None if instructions is None else instructions[image]
            length = None if instruction is None else instruction.shape[0]
            groups.setdefault((image_settings.model_dump_json(), length), []).append(image)
        else:
            rows[image] = PrunedImage(projected[image], torch.arange(num_tokens, device=patches.device))

    for members in groups.values():
        started = time.perf_counter()
        group_settings = settings[members[0]]
        spec = METHODS[group_settings.method]
        if "saliency" in spec.needs and tower.saliency is None:
            raise AssertionError(f"method {group_settings.method!r} reads saliency, which the tower did not compute")
        if "instruction" in spec.needs and (instructions is None or instructions[members[0]] is None):
            raise AssertionError(f"method {group_settings.method!r} reads an instruction, which the images lack")
        index = torch.tensor(members, device=patches.device)
        batch = TokenBatch(
            features=projected[index],
            saliency=None if tower.saliency is None else tower.saliency[index],
            pre_features=patches[index],
            cls_pre_feature=tower.hidden[index, 0],
            keys=None if tower.keys is None else tower.keys[index],
            instruction=None if instructions is None or instructions[members[0]] is None
            else torch.stack([instructions[image] for image in members]),
        )
        keep = group_settings.kept_tokens(num_tokens)
        try:
            result = reduce_tokens(group_settings.method, batch, keep, group_settings.options_model(), group_settings.order)
        except Exception as error:
            if on_failure is None:
                raise
            on_failure(group_settings, len(members), error)
            spec = METHODS["uniform"]
            result = uniform(num_tokens, keep, patches.device).expand(len(members), -1)
        kept: torch.Tensor | list[None] = [None] * len(members)
        if spec.merges:
            chosen = project(result)
        elif spec.with_cls:
            # Each CLS row projected on its own: a [B, 1, Dv] product rounds differently
            # from a [1, 1, Dv] one, and an image must not depend on its batch.
            cls_rows = torch.cat([project(tower.hidden[image : image + 1, :1]) for image in members])
            candidates = torch.cat([cls_rows, batch.features], dim=1)
            chosen = candidates.gather(1, result[:, :, None].expand(-1, -1, candidates.shape[2]))
        else:
            chosen = batch.features.gather(1, result[:, :, None].expand(-1, -1, projected.shape[2]))
            kept = result
        for position, image in enumerate(members):
            rows[image] = PrunedImage(chosen[position], kept[position])
        if on_selection is not None:
            on_selection(group_settings.method, time.perf_counter() - started)

    for image, pruned in enumerate(rows):
        expected = settings[image].kept_tokens(num_tokens)
        if pruned is None or pruned.rows.shape[0] != expected:
            got = None if pruned is None else pruned.rows.shape[0]
            raise AssertionError(f"image {image}: pruning returned {got} rows for {expected} placeholders")
    return rows  # type: ignore[return-value]


GREEDY_METHODS = frozenset({"promprune", "coverage", "divprune", "fps", "facility_location", "vispruner", "cdpruner"})
"""Methods whose selection is a loop of K steps (or rounds) over N x N matrices allocated
up front: their memory grows with K only by K-long index rows (`PROFILE_INDEX_BYTES`)."""
PEAK_SHARE = 8
"""The memory profile runs GREEDY_METHODS at K = N // PEAK_SHARE, a loop that stays short
at large N; every other method (merging, PCA-based, custom) at K = N - 1."""
PROFILE_INDEX_BYTES = 32
"""Bytes per image and per kept token beyond N // PEAK_SHARE that a greedy method may hold
and the profile does not (int64 pick rows, masks; measured up to 20), at most 32 N bytes
per image: 8 / N of one N x N float32 matrix (asserted in tests/audit/test_memory_profile.py)."""

PROFILE_OPTIONS: dict[str, list[dict[str, object]]] = {
    # mu 1 and kr_max 0.5: a split that needs the exact spectrum and gives at least half of K
    # to the coverage stage, whatever the profile image looks like; each coverage stage
    # allocates its own matrices.
    "promprune": [{"mu": 1.0, "kr_max": 0.5, "coverage": coverage} for coverage in ("dpp", "fps", "fl")],
    "prunesid": [{"pca": "exact"}, {"pca": "lowrank"}],
}
"""Option sets the memory profile runs per method (default options for the others)."""


def profile_keep(method: str, num_tokens: int) -> int:
    """The budget at which the memory profile runs `method` on an image of N tokens."""
    return max(1, num_tokens // PEAK_SHARE if method in GREEDY_METHODS else num_tokens - 1)


def memory_profile_settings(num_tokens: int, methods: Sequence[str]) -> list[PruneSettings]:
    """The selections vLLM's memory profile runs on an image of `num_tokens` selectable
    tokens, so that the KV cache is sized with selection's peak included: each of
    `methods` (those the family's tower can feed), with each of its PROFILE_OPTIONS, at
    `profile_keep`. Checked against the peak of every method over budgets and options in
    tests/audit/test_memory_profile.py.
    """
    return [
        PruneSettings(keep=profile_keep(method, num_tokens), method=method, options=options)
        for method in methods
        for options in PROFILE_OPTIONS.get(method, [{}])
    ]
