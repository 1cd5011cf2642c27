"""Pruned LLaVA-1.5: selection right after the CLIP tower and projector."""

from __future__ import annotations

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

from .. import metrics
from .clip_saliency import clip_tower_output
from .common import (
    SETTINGS_FIELD,
    PruningProcessorMixin,
    UnprunedMaxTokensMixin,
    decode_settings,
    profiled_items_per_batch,
    prune_and_record,
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
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vision = self.config.vision_config
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2
        self.encoder_micro_batch = profiled_items_per_batch(vllm_config, self.tokens_per_image)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        field = kwargs.pop(SETTINGS_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        settings = decode_settings(field, len(pixel_values))
        if not any(s.prunes(self.tokens_per_image) for s in settings):
            for image_settings in settings:
                metrics.record_image(image_settings, self.tokens_per_image, self.tokens_per_image)
            return self._process_image_input(image_input)  # exactly the stock path

        embeddings: list[torch.Tensor] = []
        for start in range(0, len(pixel_values), self.encoder_micro_batch):
            stop = start + self.encoder_micro_batch
            tower = clip_tower_output(self.vision_tower, pixel_values[start:stop])
            embeddings.extend(prune_and_record(tower, settings[start:stop], self.multi_modal_projector))
        return embeddings
