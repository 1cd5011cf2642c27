"""Glue shared by every pruned model family.

Processor side (`PruningProcessorMixin`): strip the settings before the HF
processor sees them, attach them to every image as a uint8 field, and shorten
each image's placeholder run to `PruneSettings.kept_tokens(N)`. Model side
(functions): decode the field, size the tower's micro-batches to what memory
profiling covered, and prune with metrics (`pruning.prune_images` asserts that
each image returns exactly as many rows as it has placeholders).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from .. import metrics
from ..pruning import TowerOutput, prune_images
from ..settings import SETTINGS_KEY, PruneSettings, parse_settings

SETTINGS_FIELD = "promprune_settings"
"""Name of the per-image multimodal kwarg carrying the encoded settings."""


def without_settings(hf_kwargs: Mapping[str, object]) -> dict[str, object]:
    """The kwargs minus the pruning settings (the HF processor must not see them)."""
    return {k: v for k, v in hf_kwargs.items() if k != SETTINGS_KEY}


class PruningProcessorMixin:
    """Mix into a vLLM `BaseMultiModalProcessor` subclass (put it first in the bases)."""

    option_defaults: ClassVar[Mapping[str, object]] = {}
    """Model-family defaults for method options (e.g. PromPrune's mu)."""

    def prune_settings(self, hf_processor_mm_kwargs: Mapping[str, object]) -> PruneSettings:
        server_default = getattr(self.info.get_hf_config(), SETTINGS_KEY, None)
        return parse_settings(
            hf_processor_mm_kwargs.get(SETTINGS_KEY), server_default, self.option_defaults
        )

    def num_images(self, processed_data: BatchFeature) -> int:
        """How many images the HF processor output holds (family-specific)."""
        raise NotImplementedError

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        return super()._call_hf_processor(hf_data, without_settings(hf_kwargs))

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        encoded = self.prune_settings(hf_processor_mm_kwargs).to_tensor()
        processed[SETTINGS_FIELD] = [encoded] * self.num_images(processed)
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[SETTINGS_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = self.prune_settings(hf_processor_mm_kwargs)
        if not settings.has_budget:
            return updates
        return [
            _shortened(update, settings, mm_items) if update.modality == "image" else update
            for update in updates
        ]


def _shortened(update: PromptUpdate, settings: PruneSettings, mm_items: MultiModalDataItems) -> PromptReplacement:
    """The same replacement with each image's placeholder run cut to K tokens."""

    def replacement(item_idx: int) -> list[int]:
        if isinstance(mm_items.get("image"), ImageEmbeddingItems):
            raise ValueError(
                "promprune.keep: pruning needs image pixels; it cannot apply to "
                "precomputed image_embeds (omit keep/ratio for such requests)"
            )
        content = update.replacement
        tokens = content(item_idx) if callable(content) else content
        if not isinstance(tokens, list) or len(set(tokens)) != 1:
            raise TypeError("pruning supports a replacement made of one repeated image token")
        return tokens[: settings.kept_tokens(len(tokens))]

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


def decode_settings(field: Any, num_items: int) -> list[PruneSettings]:
    """Per-item settings from the SETTINGS_FIELD kwarg (stacked tensor or list)."""
    if field is None:
        raise ValueError(f"missing {SETTINGS_FIELD}: the pruned processor always emits it")
    settings = [PruneSettings.from_tensor(item) for item in field]
    if len(settings) != num_items:
        raise ValueError(f"{SETTINGS_FIELD} has {len(settings)} items for {num_items} images")
    return settings


def prune_and_record(
    tower: TowerOutput, settings: Sequence[PruneSettings], project: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """`prune_images` plus the Prometheus counters and selection-time histogram."""
    metrics.record_images(settings, tower.saliency.shape[1])
    return prune_images(tower, settings, project, on_selection=metrics.record_selection)
