"""Glue shared by every pruned model family.

Processor side (`PruningProcessorMixin`): strip the settings before the HF
processor sees them, attach them to every image as a uint8 field, and shorten
each image's placeholder run to `PruneSettings.kept_tokens(N)`. Model side:
`pruned_image_embeddings` is the one skeleton of every family's image
embedding (decode the settings, metrics, the stock path when nothing prunes,
the tower in micro-batches sized to what memory profiling covered, a row count
check per image); the family feeds it its tower-and-prune step, which prunes
with `SELECTION_HOOKS` (metrics and the last-resort guard).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.inputs import MultiModalHashes
from vllm.logger import init_logger
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItem, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.multimodal.processing.processor import MultiModalIsCached

from ...methods import METHODS
from ...pruning import (
    CLS_TOWER_INPUTS,
    CLS_TOWER_NAME,
    Instructions,
    instruction_tokens,
    memory_profile_settings,
    non_instruction_ids,
)
from ...settings import (
    SETTINGS_KEY,
    PruneSettings,
    check_per_image_lengths,
    parse_image_settings,
    select_images,
)
from .. import metrics, planning

SETTINGS_FIELD = "promprune_settings"
"""Name of the per-image multimodal kwarg carrying the encoded settings."""
INSTRUCTION_FIELD = "promprune_instruction"
"""Name of the per-image multimodal kwarg carrying its instruction token ids (int64 [M]; empty
unless the image's method reads an instruction)."""
INSTRUCTION_KEY = "promprune_instruction_tokens"
"""Processor kwarg the pruned processor adds: the request's instruction token ids (`instruction_tokens`)."""
PROFILE_INSTRUCTION = (0,)
"""Instruction token ids the memory profile gives its CDPruner selections: the relevance's
memory does not grow with M past the N x N kernel (`cdpruner_relevance`)."""
PLANNED_KEY = "promprune_planned"
"""Processor kwarg the pruned processor adds for adaptive budgets: per image (prompt order)
`{"complexity": c_i, "plan_key": key}` from the planning pass, or None (`planning`)."""
MEMORY_PROFILE_KEY = "memory_profile"
"""Key of the SETTINGS_FIELD payload of vLLM's profiling items: the methods the profile runs."""

_MAKING_DUMMY_INPUTS: ContextVar[bool] = ContextVar("promprune_making_dummy_inputs", default=False)
_RUNNING_MEMORY_PROFILE: ContextVar[bool] = ContextVar("promprune_running_memory_profile", default=False)
PROFILED_PEAK_BYTES: list[int] = []
"""On CUDA: the device's peak allocated bytes when each memory-profile run ended."""
PROFILED_SELECTIONS: list[tuple[str, int, int, int]] = []
"""(method, N, K, images) of every micro-batch selection the memory profile ran in this
process (N and K of its first image)."""

logger = init_logger(__name__)


def without_settings(hf_kwargs: Mapping[str, object]) -> dict[str, object]:
    """The kwargs minus the pruning settings and instruction: the HF processor must not see
    them, and vLLM caches HF processors keyed by these kwargs (lists are unhashable)."""
    return {k: v for k, v in hf_kwargs.items() if k not in (SETTINGS_KEY, INSTRUCTION_KEY, PLANNED_KEY)}


class UnprunedMaxTokensMixin:
    """Mix into a `BaseProcessingInfo` subclass (first in the bases).

    Reports the UNPRUNED worst-case tokens per image, so memory profiling and the
    encoder-cache size stay worst-case even when a server default budget would
    shorten the dummy profiling prompt.
    """

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}


class PruningProcessorMixin:
    """Mix into a vLLM `BaseMultiModalProcessor` subclass (put it first in the bases)."""

    option_defaults: ClassVar[Mapping[str, object]] = {}
    """Model-family defaults for method options (e.g. PromPrune's mu)."""
    tower_inputs: ClassVar[frozenset[str]] = CLS_TOWER_INPUTS
    """The `TokenBatch` inputs this family's tower provides (methods needing others are refused)."""
    tower_name: ClassVar[str] = CLS_TOWER_NAME

    def prune_settings(self, hf_processor_mm_kwargs: Mapping[str, object], num_images: int) -> list[PruneSettings]:
        """Validated settings for each of the `num_images` images being processed."""
        server_default = getattr(self.info.get_hf_config(), SETTINGS_KEY, None)
        settings = parse_image_settings(
            hf_processor_mm_kwargs.get(SETTINGS_KEY), num_images, server_default, self.option_defaults
        )
        planned = hf_processor_mm_kwargs.get(PLANNED_KEY)
        if planned is not None and len(planned) != num_images:
            raise AssertionError(f"{len(planned)} planned budgets for {num_images} images")
        for image, image_settings in enumerate(settings):
            if image_settings.needs_plan and making_dummy_inputs():
                # vLLM's profiling prompts: stock placeholders (their items carry markers anyway).
                settings[image] = image_settings.model_copy(update={"keep": None})
            elif image_settings.needs_plan and planned is not None and planned[image] is not None:
                settings[image] = image_settings.planned_for(planned[image]["complexity"], planned[image]["plan_key"])
        for image_settings in settings:
            image_settings.check_inputs(self.tower_inputs, self.tower_name)
            if image_settings.reads_instruction and not hf_processor_mm_kwargs.get(INSTRUCTION_KEY):
                if not making_dummy_inputs():
                    raise ValueError(
                        f"{SETTINGS_KEY}.method {image_settings.method!r} selects by the instruction, and this "
                        "prompt has no text besides special and image tokens: add the question, or use "
                        "another method for text-free prompts"
                    )
        return settings

    def apply(self, inputs: ProcessorInputs, *args: Any, **kwargs: Any):  # noqa: ANN201 (MultiModalInput)
        # The request's instruction rides along with the pruning settings, so that hashing
        # (an image's identity includes it when its method reads it) and processing both see it.
        instruction = self.instruction_tokens(inputs.prompt)
        own = {k: v for k, v in inputs.hf_processor_mm_kwargs.items() if k != PLANNED_KEY}  # only the pass plans
        inputs = replace(inputs, hf_processor_mm_kwargs={**own, INSTRUCTION_KEY: instruction})
        planned = self.planned_budgets(inputs)
        if planned is not None:
            inputs = replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, PLANNED_KEY: planned})
        return super().apply(inputs, *args, **kwargs)

    def planned_budgets(self, inputs: ProcessorInputs) -> list[dict[str, object] | None] | None:
        """Per image, the planning pass's outcome if its settings are adaptive (None for the
        others); None if no image's are. Raises ValueError (400) for requests adaptive
        budgets cannot serve, PlanningUnavailable (503) if the pass cannot run."""
        num_images = inputs.mm_data_items.get_count("image", strict=False)
        if making_dummy_inputs() or not num_images:
            return None
        settings = self.prune_settings(inputs.hf_processor_mm_kwargs, num_images)
        adaptive = [image for image, image_settings in enumerate(settings) if image_settings.needs_plan]
        if not adaptive:
            return None
        if not isinstance(inputs.mm_data_items.get("image"), ImageProcessorItems):
            raise ValueError(f"{SETTINGS_KEY}.keep_mode: adaptive budgets need image pixels, not embeddings")
        plan_keys = self._get_mm_hashes(inputs)["image"]

        def encode(positions: Sequence[int]) -> list[MultiModalKwargsItem]:
            kwargs = inputs.hf_processor_mm_kwargs
            processed = self._apply_hf_processor_main(inputs.mm_data_items, kwargs)
            items = MultiModalKwargsItems.from_hf_inputs(processed, self._get_mm_fields_config(processed, kwargs))
            return [items["image"][adaptive[position]] for position in positions]

        values = planning.complexities(self.info.ctx.model_config, [plan_keys[i] for i in adaptive], encode)
        planned: list[dict[str, object] | None] = [None] * num_images
        for image, value in zip(adaptive, values):
            planned[image] = {"complexity": value, "plan_key": plan_keys[image]}
        return planned

    def instruction_tokens(self, prompt: Sequence[int]) -> list[int]:
        """The prompt's instruction token ids (`pruning.instruction_tokens`)."""
        excluded = getattr(self, "_non_instruction_ids", None)
        if excluded is None:
            excluded = self._non_instruction_ids = non_instruction_ids(self.info.get_tokenizer(), self.info.get_hf_config())
        return instruction_tokens(prompt, excluded)

    def profiled_methods(self) -> list[str]:
        """The methods this family's tower can feed: what vLLM's memory profile runs."""
        return [name for name, spec in METHODS.items() if set(spec.needs) <= self.tower_inputs]

    def get_dummy_mm_inputs(self, mm_counts: Mapping[str, int], **kwargs: Any):  # noqa: ANN201
        # vLLM's memory profile (and nothing a client sends) builds its items here: they
        # carry a marker instead of settings, so the model runs every selection on them
        # at their (maximum) size and the KV cache is sized with selection's peak included.
        making = _MAKING_DUMMY_INPUTS.set(True)
        try:
            return super().get_dummy_mm_inputs(mm_counts, **kwargs)
        finally:
            _MAKING_DUMMY_INPUTS.reset(making)

    def _get_mm_hashes(self, inputs: ProcessorInputs) -> MultiModalHashes:
        # vLLM hashes the whole request's kwargs into every item: two copies of one image
        # with budgets [3, 300] would share one identity (the processor cache would serve the
        # second copy, and its 3 placeholders, from the first), and an image's identity would
        # change with its neighbours' budgets. Each image is hashed with its OWN resolved
        # settings (server default included) instead; other modalities with none.
        stock_kwargs = without_settings(inputs.hf_processor_mm_kwargs)
        hashes = dict(super()._get_mm_hashes(replace(inputs, hf_processor_mm_kwargs=stock_kwargs)))
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        if _MAKING_DUMMY_INPUTS.get():  # profiling items (they carry markers) never share a request's identity
            return {
                modality: [MultiModalHasher.hash_kwargs(algorithm, mm_hash=h, promprune=MEMORY_PROFILE_KEY) for h in items]
                for modality, items in hashes.items()
            }
        images = hashes.get("image")
        if images:
            settings = self.prune_settings(inputs.hf_processor_mm_kwargs, len(images))
            instruction = json.dumps(inputs.hf_processor_mm_kwargs.get(INSTRUCTION_KEY) or [])
            hashes["image"] = [
                MultiModalHasher.hash_kwargs(
                    algorithm, mm_hash=image_hash, promprune=image_settings.model_dump_json(),
                    **({"instruction": instruction} if image_settings.reads_instruction else {}),
                )
                for image_hash, image_settings in zip(images, settings, strict=True)
            ]
        return hashes

    def _get_cache_missing_processor_kwargs(
        self, inputs: ProcessorInputs, mm_is_cached: MultiModalIsCached
    ) -> Mapping[str, object]:
        # vLLM processes only the images missing from its processor cache, numbered
        # from 0: per-image budget lists must be cut down to those images.
        kwargs = dict(super()._get_cache_missing_processor_kwargs(inputs, mm_is_cached))
        cached = mm_is_cached.get("image", [])
        missing = [image for image, is_cached in enumerate(cached) if not is_cached]
        if kwargs.get(PLANNED_KEY) is not None:  # planned under a request's or the server's settings
            kwargs[PLANNED_KEY] = [kwargs[PLANNED_KEY][image] for image in missing]
        raw = kwargs.get(SETTINGS_KEY)
        if isinstance(raw, Mapping):
            check_per_image_lengths(raw, len(cached))
            kwargs[SETTINGS_KEY] = select_images(raw, missing)
        return kwargs

    def num_images(self, processed_data: BatchFeature) -> int:
        """How many images the HF processor output holds (LLaVA layout; Qwen overrides)."""
        images = processed_data.get("pixel_values", processed_data.get("image_embeds"))
        return 0 if images is None else len(images)

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # The one entry to every family's HF processing (Qwen3-VL overrides it and never
        # calls `_call_hf_processor`): nothing below it sees the settings.
        processed = super()._apply_hf_processor_main(mm_items, without_settings(hf_kwargs))
        settings = self.prune_settings(hf_kwargs, self.num_images(processed))
        if making_dummy_inputs():
            marker = memory_profile_marker(self.profiled_methods())
            processed[SETTINGS_FIELD] = [marker.clone() for _ in settings]
        else:
            processed[SETTINGS_FIELD] = [image_settings.to_tensor() for image_settings in settings]
        instruction = torch.tensor(hf_kwargs.get(INSTRUCTION_KEY) or [], dtype=torch.int64)
        processed[INSTRUCTION_FIELD] = [
            instruction.clone() if image_settings.reads_instruction else torch.empty(0, dtype=torch.int64)
            for image_settings in settings
        ]
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, without_settings(hf_processor_mm_kwargs)))
        fields[SETTINGS_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        fields[INSTRUCTION_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def check_pruned_images(self, settings: Sequence[PruneSettings], out_mm_kwargs: MultiModalKwargsItems) -> None:
        """Refuse (ValueError naming the field) budgets the model side could not execute;
        nothing to check by default (Qwen: the M-RoPE position range)."""

    def content_tokens(self, mm_items: MultiModalDataItems, item_idx: int, num_stock: int) -> int:
        """Selectable tokens of image `item_idx`, whose stock placeholder run is `num_stock`.

        All of them by default; families with layout tokens (LLaVA-NeXT newlines) override.
        """
        return num_stock

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, without_settings(hf_processor_mm_kwargs), out_mm_kwargs)
        settings = self.prune_settings(hf_processor_mm_kwargs, mm_items.get_count("image", strict=False))
        if not any(image_settings.has_budget for image_settings in settings):
            return updates
        if not isinstance(mm_items.get("image"), ImageProcessorItems):  # tensor or dict (Qwen) embeddings
            raise ValueError(
                "promprune.keep: pruning needs image pixels; it cannot apply to precomputed "
                "image embeddings (omit keep/ratio, or opt out with keep: null, for such requests)"
            )
        self.check_pruned_images(settings, out_mm_kwargs)
        return [self._shortened(update, settings, mm_items) if update.modality == "image" else update for update in updates]

    def _shortened(
        self, update: PromptUpdate, settings: Sequence[PruneSettings], mm_items: MultiModalDataItems
    ) -> PromptUpdate:
        """The same update with image i's placeholder run cut to `settings[i].placeholders`."""

        def replacement(item_idx: int) -> list[int]:
            content = update.replacement
            tokens = content(item_idx) if callable(content) else content
            if not isinstance(tokens, list) or len(set(tokens)) != 1:
                raise TypeError("pruning supports a replacement made of one repeated image token")
            num_content = self.content_tokens(mm_items, item_idx, len(tokens))
            return tokens[: settings[item_idx].placeholders(num_content, len(tokens))]

        return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)


def profiled_items_per_batch(vllm_config: VllmConfig, tokens_per_item: int, modality: str = "image") -> int:
    """How many items vLLM's encoder memory profile runs at once.

    Mirrors `MultiModalBudget` with the UNPRUNED per-item token count: the
    scheduler charges a pruned image only K tokens, so it may hand the tower
    many more images than profiling measured.
    """
    scheduler = vllm_config.scheduler_config
    model = vllm_config.model_config
    budget = min(
        max(scheduler.max_num_encoder_input_tokens, tokens_per_item),
        max(scheduler.encoder_cache_size, tokens_per_item),
    )
    limit = model.multimodal_config.get_limit_per_prompt(modality)
    per_prompt = max(1, min(limit, model.max_model_len // tokens_per_item))
    max_requests = scheduler.max_num_seqs
    if not scheduler.enable_chunked_prefill:
        max_requests = min(max_requests, scheduler.max_num_batched_tokens // tokens_per_item)
    return max(1, min(budget // tokens_per_item, max_requests * per_prompt))


def making_dummy_inputs() -> bool:
    """Whether the processor is building vLLM's profiling items right now."""
    return _MAKING_DUMMY_INPUTS.get()


def memory_profile_marker(methods: Sequence[str]) -> torch.Tensor:
    """SETTINGS_FIELD payload of a profiling item: run `methods` on it (uint8 JSON)."""
    return torch.frombuffer(bytearray(json.dumps({MEMORY_PROFILE_KEY: list(methods)}).encode()), dtype=torch.uint8)


def memory_profile_methods(payload: torch.Tensor) -> list[str] | None:
    """The methods a `memory_profile_marker` names (None: `payload` is no marker)."""
    if payload.numel() == 0:
        return None
    decoded = json.loads(bytes(payload.to(torch.uint8).tolist()))
    return decoded.get(MEMORY_PROFILE_KEY) if isinstance(decoded, dict) else None


def decode_settings(field: Any, num_items: int) -> list[PruneSettings] | list[str]:
    """Per-item settings from the SETTINGS_FIELD kwarg (stacked tensor or list), or, for
    vLLM's profiling items, the methods the memory profile runs on them."""
    if field is None:
        raise ValueError(f"missing {SETTINGS_FIELD}: the pruned processor always emits it")
    payloads = [json.loads(bytes(item.to(torch.uint8).tolist())) for item in field]
    if len(payloads) != num_items:
        raise ValueError(f"{SETTINGS_FIELD} has {len(payloads)} items for {num_items} images")
    profiled = [payload[MEMORY_PROFILE_KEY] for payload in payloads if MEMORY_PROFILE_KEY in payload]
    if profiled:
        if len(profiled) != num_items or any(methods != profiled[0] for methods in profiled):
            raise AssertionError("profiling items were batched with other items")
        return profiled[0]
    return [PruneSettings.model_validate(payload) for payload in payloads]


def report_selection_failure(settings: PruneSettings, num_images: int, error: BaseException) -> None:
    """Last-resort guard's report: one log line (with the traceback the first time a
    method fails in this process) and the failures counter."""
    first = settings.method not in _FAILED_METHODS
    _FAILED_METHODS.add(settings.method)
    logger.error(
        "promprune: selection raised for %d image(s) with settings %s; they fall back to "
        "evenly strided tokens (the other requests are unaffected): %s: %s",
        num_images, settings.model_dump_json(), type(error).__name__, error, exc_info=error if first else None,
    )
    metrics.record_selection_failure(settings.method)


_FAILED_METHODS: set[str] = set()

def _record_selection(method: str, seconds: float) -> None:
    if not _RUNNING_MEMORY_PROFILE.get():  # the profile's selections are not served requests
        metrics.record_selection(method, seconds)


SELECTION_HOOKS: Mapping[str, Any] = {
    "on_selection": _record_selection,
    "on_failure": report_selection_failure,
}
"""Keyword arguments of `pruning.prune_images*` / `anyres.prune_anyres` inside the engine."""


@dataclass(frozen=True)
class ImageGeometry:
    """What the skeleton needs to know of one image before its tower runs."""

    num_content: int  # selectable tokens N
    num_stock: int  # placeholders of the unpruned image (N plus layout tokens)
    tower_cost: int  # units of the family's micro-batch budget (images, views or patches)


def micro_batches(costs: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive item ranges costing at most `budget` (at least one item each)."""
    ranges, start, total = [], 0, 0
    for item, cost in enumerate(costs):
        if item > start and total + cost > budget:
            ranges.append((start, item))
            start, total = item, 0
        total += cost
    ranges.append((start, len(costs)))
    return ranges


EmbedImages = Callable[[int, int, Sequence[PruneSettings], Instructions], list[torch.Tensor]]
"""`embed(start, stop, settings, instructions)`: the LLM rows of images start..stop-1 (pruned
or not); `instructions` holds their instruction embeddings (`pruning.prune_images`' argument)."""
EmbedTokens = Callable[[torch.Tensor], torch.Tensor]
"""The language model's input embedding: token ids [M] -> [M, D] (`language_model_embedding`)."""


def language_model_embedding(model: Any) -> EmbedTokens:
    """The LLM's own `embed_tokens` (vocab-parallel under TP) for instruction token ids."""
    language_model = model.get_language_model()

    def embed_tokens(ids: torch.Tensor) -> torch.Tensor:
        return language_model.embed_input_ids(ids.to(next(language_model.parameters()).device))

    return embed_tokens


def instruction_embeddings(
    field: Any, settings: Sequence[PruneSettings], embed_tokens: EmbedTokens
) -> list[torch.Tensor | None]:
    """Per image: its instruction's LLM embeddings [M, D] (float32) if its method reads them, else None."""
    if field is None:
        raise ValueError(f"missing {INSTRUCTION_FIELD}: the pruned processor always emits it")
    return [
        embed_tokens(ids).float() if image_settings.reads_instruction else None
        for ids, image_settings in zip(field, settings, strict=True)
    ]


def pruned_image_embeddings(
    field: Any,
    geometry: Sequence[ImageGeometry],
    budget: int,
    stock: Callable[[], Sequence[torch.Tensor]],
    embed: EmbedImages,
    instruction_field: Any,
    embed_tokens: EmbedTokens,
) -> list[torch.Tensor]:
    """Every family's image embeddings, one [rows, D] tensor per image.

    Decodes the settings `field`, counts each image's tokens before and after, and
    returns `stock()` (vLLM's own path, bit-identical) when no image prunes.
    Otherwise embeds the instructions of images whose method reads one
    (`instruction_field`, with the LLM's `embed_tokens`), runs `embed` over
    micro-batches of at most `budget` tower units and checks that each image returns
    exactly as many rows as it has placeholders (vLLM would silently use the first
    rows if there were more). Images with rows from their adaptive-budget planning pass
    (`planning.PLANNED`) take those; only the others run through `embed`. The planning
    pass itself comes here with unplanned settings, whose row counts selection decides.
    """
    decoded = decode_settings(field, len(geometry))
    if decoded and isinstance(decoded[0], str):
        run_memory_profile(decoded, geometry, budget, embed, embed_tokens)
        return list(stock())
    settings: list[PruneSettings] = decoded  # type: ignore[assignment]
    for image_settings, image in zip(settings, geometry):
        if not image_settings.needs_plan:  # a planning pass serves no tokens
            metrics.record_image(image_settings, image.num_content, image.num_stock)
    if not any(s.prunes(image.num_content) for s, image in zip(settings, geometry)):
        return list(stock())
    planned_rows = [
        None if s.planned is None else planning.PLANNED.take(s, s.placeholders(image.num_content, image.num_stock))
        for s, image in zip(settings, geometry)
    ]
    instructions = instruction_embeddings(instruction_field, settings, embed_tokens)
    rows: list[torch.Tensor] = []
    for start, stop in micro_batches([image.tower_cost for image in geometry], budget):
        # Planned rows as they are; the images between them through `embed`, run by run.
        while start < stop:
            if planned_rows[start] is not None:
                rows.append(planned_rows[start])  # type: ignore[arg-type]
                start += 1
                continue
            end = next((i for i in range(start, stop) if planned_rows[i] is not None), stop)
            rows.extend(embed(start, end, settings[start:end], instructions[start:end]))
            start = end
    for index, (image_rows, image_settings, image) in enumerate(zip(rows, settings, geometry, strict=True)):
        if image_settings.needs_plan:
            continue  # the planning pass: the budget was decided from the tower (`pruning.plan_budgets`)
        expected = image_settings.placeholders(image.num_content, image.num_stock)
        if image_rows.shape[0] != expected:
            raise AssertionError(f"image {index}: {image_rows.shape[0]} rows for {expected} placeholders")
    return rows


def run_memory_profile(
    methods: Sequence[str], geometry: Sequence[ImageGeometry], budget: int, embed: EmbedImages, embed_tokens: EmbedTokens
) -> None:
    """Run every selection of `memory_profile_settings` on vLLM's profiling items (at the
    micro-batches a request's images would get), discarding the rows: vLLM measures the
    peak memory of this run to size the KV cache. Recorded in PROFILED_SELECTIONS.
    Selections that read an instruction get `PROFILE_INSTRUCTION`'s."""
    per_image = [memory_profile_settings(image.num_content, methods) for image in geometry]
    instruction = embed_tokens(torch.tensor(PROFILE_INSTRUCTION)).float()
    running = _RUNNING_MEMORY_PROFILE.set(True)
    try:
        for column in zip(*per_image, strict=True):
            for start, stop in micro_batches([image.tower_cost for image in geometry], budget):
                instructions = [instruction if s.reads_instruction else None for s in column[start:stop]]
                embed(start, stop, column[start:stop], instructions)
                first, tokens = column[start], geometry[start].num_content
                PROFILED_SELECTIONS.append((first.method, tokens, first.kept_tokens(tokens), stop - start))
    finally:
        _RUNNING_MEMORY_PROFILE.reset(running)
    if torch.cuda.is_available():
        PROFILED_PEAK_BYTES.append(torch.cuda.max_memory_allocated())
    logger.info(
        "promprune: vLLM's memory profile ran %d selections (%s) on %d image(s) of up to %d tokens",
        len(per_image[0]), ", ".join(dict.fromkeys(methods)), len(geometry), max(image.num_content for image in geometry),
    )
