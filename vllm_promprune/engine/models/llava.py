"""Pruned LLaVA-1.5: selection right after the CLIP tower and projector."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...pruning import Instructions, prune_images
from ...settings import PruneSettings
from .clip_saliency import check_clip_llava_config, clip_tower_output
from .common import (
    INSTRUCTION_FIELD,
    SELECTION_HOOKS,
    SETTINGS_FIELD,
    ImageGeometry,
    PruningProcessorMixin,
    UnprunedMaxTokensMixin,
    language_model_embedding,
    profiled_items_per_batch,
    pruned_image_embeddings,
)


class PromPruneLlavaProcessingInfo(UnprunedMaxTokensMixin, LlavaProcessingInfo):
    pass


class PromPruneLlavaMultiModalProcessor(PruningProcessorMixin, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PromPruneLlavaMultiModalProcessor,
    info=PromPruneLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PromPruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-1.5 whose image embeddings are the K tokens the settings select."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_clip_llava_config(vllm_config.model_config.hf_config, "LLaVA")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vision = self.config.vision_config
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2
        self.encoder_micro_batch = profiled_items_per_batch(vllm_config, self.tokens_per_image)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        field = kwargs.pop(SETTINGS_FIELD, None)
        instruction_field = kwargs.pop(INSTRUCTION_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]

        def embed(start: int, stop: int, settings: Sequence[PruneSettings], instructions: Instructions) -> list[torch.Tensor]:
            tower = clip_tower_output(self.vision_tower, pixel_values[start:stop])
            return prune_images(tower, settings, self.multi_modal_projector, **SELECTION_HOOKS, instructions=instructions)

        image = ImageGeometry(self.tokens_per_image, self.tokens_per_image, tower_cost=1)
        return pruned_image_embeddings(
            field, [image] * len(pixel_values), self.encoder_micro_batch, lambda: self._process_image_input(image_input),
            embed, instruction_field, language_model_embedding(self),
        )
