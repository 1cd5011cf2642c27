"""Pruned LLaVA-NeXT: selection over the AnyRes views right after the CLIP tower.

The token layout (content tokens, newlines, budget modes) is defined once in
`vllm_promprune.anyres`; the processor and the model both derive their counts
from `anyres_layout`, and the processor checks it against vLLM's own count.
"""

from __future__ import annotations

import torch

from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems

from .. import metrics
from ..anyres import AnyResLayout, anyres_layout, prune_anyres
from .clip_saliency import clip_tower_output_chunked
from .common import (
    SETTINGS_FIELD,
    PruningProcessorMixin,
    UnprunedMaxTokensMixin,
    decode_settings,
    profiled_items_per_batch,
)


def layout_for(config, height: int, width: int) -> AnyResLayout:  # noqa: ANN001 (LlavaNextConfig)
    vision = config.vision_config
    return anyres_layout(height, width, config.image_grid_pinpoints, vision.image_size, vision.patch_size)


class PromPruneLlavaNextProcessingInfo(UnprunedMaxTokensMixin, LlavaNextProcessingInfo):
    pass


class PromPruneLlavaNextMultiModalProcessor(PruningProcessorMixin, LlavaNextMultiModalProcessor):
    def content_tokens(self, mm_items: MultiModalDataItems, item_idx: int, num_stock: int) -> int:
        size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
        layout = layout_for(self.info.get_hf_config(), size.height, size.width)
        if layout.num_stock_tokens != num_stock:
            raise AssertionError(
                f"AnyRes layout of a {size.width}x{size.height} image has {layout.num_stock_tokens} "
                f"tokens, vLLM counts {num_stock}"
            )
        return layout.num_content


@MULTIMODAL_REGISTRY.register_processor(
    PromPruneLlavaNextMultiModalProcessor,
    info=PromPruneLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PromPruneLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """LLaVA-NeXT whose image embeddings are the K tokens the settings select."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.select_layers is not None or self.config.vision_feature_select_strategy != "default":
            raise ValueError("pruned LLaVA-NeXT supports one vision_feature_layer with strategy 'default'")
        largest = max(
            (layout_for(self.config, height, width) for height, width in self.config.image_grid_pinpoints),
            key=lambda layout: layout.num_stock_tokens,
        )
        images_per_batch = profiled_items_per_batch(vllm_config, largest.num_stock_tokens)
        self.views_per_batch = images_per_batch * largest.num_views

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        field = kwargs.pop(SETTINGS_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        pixel_values, image_sizes = image_input["pixel_values"], image_input["image_sizes"]
        settings = decode_settings(field, len(pixel_values))
        layouts = [layout_for(self.config, *size.tolist()) for size in image_sizes]
        for image_settings, layout in zip(settings, layouts):
            metrics.record_image(image_settings, layout.num_content, layout.num_stock_tokens)
        if not any(s.prunes(layout.num_content) for s, layout in zip(settings, layouts)):
            return self._process_image_input(image_input)  # exactly the stock path

        views = torch.cat([pixels[: layout.num_views] for pixels, layout in zip(pixel_values, layouts)])
        tower = clip_tower_output_chunked(self.vision_tower, views, self.views_per_batch)
        embeddings: list[torch.Tensor] = []
        start = 0
        for image_settings, layout, size in zip(settings, layouts, image_sizes):
            image_tower = tower.rows(start, start + layout.num_views)
            start += layout.num_views
            if image_settings.prunes(layout.num_content):
                rows = prune_anyres(
                    image_tower, layout, image_settings, self.multi_modal_projector, metrics.record_selection
                )
            else:
                projected = self.multi_modal_projector(image_tower.hidden[:, 1:])
                rows = self._merge_image_patch_embeddings(size, projected, strategy="spatial_unpad")
            if rows.shape[0] != image_settings.placeholders(layout.num_content, layout.num_stock_tokens):
                raise AssertionError(f"pruned LLaVA-NeXT image returned {rows.shape[0]} rows")
            embeddings.append(rows)
        return embeddings
