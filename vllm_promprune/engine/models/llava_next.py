"""Pruned LLaVA-NeXT: selection over the AnyRes views right after the CLIP tower.

The token layout (content tokens, newlines, budget modes) is defined once in
`vllm_promprune.families.anyres`; the processor and the model both derive their counts
from `anyres_layout`, and the processor checks it against vLLM's own count.
"""

from __future__ import annotations

from collections.abc import Sequence

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

from ...families.anyres import AnyResLayout, anyres_layout, prune_anyres_images
from ...pruning import Instructions, TowerOutput
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
        check_clip_llava_config(vllm_config.model_config.hf_config, "LLaVA-NeXT")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        largest = max(
            (layout_for(self.config, height, width) for height, width in self.config.image_grid_pinpoints),
            key=lambda layout: layout.num_stock_tokens,
        )
        images_per_batch = profiled_items_per_batch(vllm_config, largest.num_stock_tokens)
        self.views_per_batch = images_per_batch * largest.num_views

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        field = kwargs.pop(SETTINGS_FIELD, None)
        instruction_field = kwargs.pop(INSTRUCTION_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        pixel_values, image_sizes = image_input["pixel_values"], image_input["image_sizes"]
        layouts = [layout_for(self.config, *size.tolist()) for size in image_sizes]

        def embed(start: int, stop: int, settings: Sequence[PruneSettings], instructions: Instructions) -> list[torch.Tensor]:
            views = torch.cat([pixel_values[i][: layouts[i].num_views] for i in range(start, stop)])
            tower = clip_tower_output(self.vision_tower, views)
            rows: list[torch.Tensor | None] = []
            pruned: list[tuple[int, tuple[TowerOutput, AnyResLayout, PruneSettings]]] = []  # (row, image)
            pruned_instructions = []
            first_view = 0
            for image, image_settings, instruction in zip(range(start, stop), settings, instructions):
                layout = layouts[image]
                image_tower = tower.rows(first_view, first_view + layout.num_views)
                first_view += layout.num_views
                if image_settings.prunes(layout.num_content):
                    pruned.append((len(rows), (image_tower, layout, image_settings)))
                    pruned_instructions.append(instruction)
                    rows.append(None)
                else:
                    projected = self.multi_modal_projector(image_tower.hidden[:, 1:])
                    size = image_sizes[image]
                    rows.append(self._merge_image_patch_embeddings(size, projected, strategy="spatial_unpad"))
            # Images of one layout select as one batch (each as it would alone).
            selected = prune_anyres_images(
                [image for _, image in pruned], self.multi_modal_projector, **SELECTION_HOOKS, instructions=pruned_instructions
            )
            for (row, _), image_rows in zip(pruned, selected, strict=True):
                rows[row] = image_rows
            return rows  # type: ignore[return-value]

        geometry = [ImageGeometry(layout.num_content, layout.num_stock_tokens, layout.num_views) for layout in layouts]
        return pruned_image_embeddings(
            field, geometry, self.views_per_batch, lambda: self._process_image_input(image_input), embed,
            instruction_field, language_model_embedding(self),
        )
