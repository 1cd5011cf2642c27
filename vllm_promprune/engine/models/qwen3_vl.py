"""Pruned Qwen3-VL (dense and MoE): the Qwen template (`models/qwen.py`) on Qwen3-VL's tower.

Every block of Qwen3-VL's tower attends over the whole image and patches arrive in
merge-group order, so saliency is the attention received at the last block
(`depth - 1`), as for Qwen2-VL. What Qwen3-VL adds is deepstack: the tower also
merges the outputs of `deepstack_visual_indexes` blocks, and vLLM carries those
rows beside the main embedding (concatenated along the hidden dimension) to add
them to the hidden states of the first LLM layers. A pruned image's rows are the
K kept merged tokens in the main embedding AND in every deepstack level, with the
same indices, so each kept token's deepstack features reach the slot it fills.

Positions: Qwen3-VL lays videos out frame by frame, each frame its own
`<|vision_start|>` run after a timestamp; images are one run. Both keep their
stock positions here (vLLM's own frame walk), pruned images their grid offsets.

Videos are not pruned by this plugin. vLLM's own video pruning for Qwen3-VL
(`--video-pruning-rate`, EVS / VidCom2) moves video rows and their positions in
a layout of its own; the pruned models refuse it at start-up rather than mix
the two position schemes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_vl import (
    Qwen3_VisionTransformer,
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec

from ...families.qwen_vision import Media, mrope_positions, raster_tower_outputs
from ...pruning import TowerOutput
from ..plugin import video_pruning_refused
from .qwen import PrunedQwenMixin, PrunedQwenProcessorMixin, received_saliency, rotated_query_key


class PromPruneQwen3VLMultiModalProcessor(PrunedQwenProcessorMixin, Qwen3VLMultiModalProcessor):
    mrope_cache_factor = 1  # vLLM's `mrope_positions_factor` without video pruning


def qwen_tower_outputs(
    visual: Qwen3_VisionTransformer, pixel_values: torch.Tensor, grid_thw: list[list[int]], saliency: Sequence[bool]
) -> tuple[list[TowerOutput], list[torch.Tensor]]:
    """Per image: pruning inputs (`merged_tower_outputs`, saliency from the last block where
    `saliency` asks for it, features from the main embedding) and the stock rows
    [N, D * (1 + deepstack levels)] (main embedding, then each level).

    `Qwen3_VisionTransformer.forward` of vLLM 0.32, step for step (its blocks are
    compile-decorated, so hooks cannot observe them), keeping the last block's input
    (for its q and k) and the merger's input.
    """
    metadata = visual.prepare_encoder_metadata(grid_thw)
    hidden = visual.patch_embed(visual.input_norm(pixel_values.to(device=visual.device), visual.dtype))
    hidden = (hidden + metadata["pos_embeds"]).unsqueeze(1)
    levels = []
    for index, block in enumerate(visual.blocks):
        block_input = hidden
        hidden = block(
            hidden,
            cu_seqlens=metadata["cu_seqlens"],
            rotary_pos_emb_cos=metadata["rotary_pos_emb_cos"],
            rotary_pos_emb_sin=metadata["rotary_pos_emb_sin"],
            max_seqlen=metadata["max_seqlen"],
            sequence_lengths=metadata.get("sequence_lengths"),
        )
        if index in visual.deepstack_visual_indexes:
            levels.append(visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(index)](hidden))
    merged = visual.merger(hidden)
    embeddings = torch.cat([merged, *levels], dim=1)

    block = visual.blocks[-1]
    received = received_saliency(block.attn, lambda: rotated_query_key(block, block_input, metadata), grid_thw, saliency)

    unit = visual.spatial_merge_unit
    sizes = [t * h * w // unit for t, h, w in grid_thw]
    return raster_tower_outputs(received, hidden, unit, sizes, merged), list(embeddings.split(sizes))


class PrunedQwen3VLMixin(PrunedQwenMixin):
    """Mix first into vLLM's Qwen3-VL (dense or MoE) model class."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        if vllm_config.model_config.multimodal_config.is_multimodal_pruning_enabled():
            raise video_pruning_refused(self.family_name)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def tower_outputs(
        self, pixel_values: torch.Tensor, grid_thw: list[list[int]], saliency: Sequence[bool]
    ) -> tuple[list[TowerOutput], list[torch.Tensor]]:
        return qwen_tower_outputs(self.visual, pixel_values, grid_thw, saliency)

    def kept_rows(self, projected: torch.Tensor, kept: torch.Tensor, stock_rows: torch.Tensor) -> torch.Tensor:
        """[K, D * (1 + levels)]: the projected kept tokens, then their rows of every deepstack level."""
        deepstack = stock_rows[kept.to(stock_rows.device), self.visual_dim :]
        return torch.cat([projected.to(deepstack.dtype), deepstack], dim=1)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        config = self.config
        merge = config.vision_config.spatial_merge_size
        media = []
        for feature in sorted(mm_features, key=lambda feature: feature.mm_position.offset):
            if feature.modality == "image":
                t, h, w = feature.data["image_grid_thw"].data.tolist()
                media.append(Media(feature.mm_position.offset, feature.mm_position.length, (t, h // merge, w // merge)))
                continue
            frames = Qwen3VLForConditionalGeneration._iter_mm_grid_hw(
                input_tokens,
                [feature],
                video_token_id=config.video_token_id,
                vision_start_token_id=config.vision_start_token_id,
                vision_end_token_id=config.vision_end_token_id,
                spatial_merge_size=merge,
            )
            media.extend(Media(offset, count, (1, grid_h, grid_w)) for offset, grid_h, grid_w, count in frames)
        return mrope_positions(len(input_tokens), media)


@MULTIMODAL_REGISTRY.register_processor(
    PromPruneQwen3VLMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PromPruneQwen3VLForConditionalGeneration(PrunedQwen3VLMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose image embeddings are the K tokens the settings select."""

    family_name = "Qwen3-VL"


@MULTIMODAL_REGISTRY.register_processor(
    PromPruneQwen3VLMultiModalProcessor,
    info=Qwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PromPruneQwen3VLMoeForConditionalGeneration(PrunedQwen3VLMixin, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE whose image embeddings are the K tokens the settings select."""

    family_name = "Qwen3-VL-MoE"
