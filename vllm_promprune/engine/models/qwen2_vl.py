"""Pruned Qwen2-VL: the Qwen template (`models/qwen.py`) on Qwen2-VL's tower.

Every block of Qwen2-VL's tower attends over the whole image (no window
attention), and its patches arrive in merge-group order, so saliency is the
attention received at the last block (`depth - 1`) and merge groups are
consecutive rows. Videos are served as stock vLLM serves them (vLLM 0.32 has no
video pruning for Qwen2-VL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VisionTransformer,
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...families.qwen_vision import raster_tower_outputs
from ...pruning import TowerOutput
from .qwen import PrunedQwenMixin, PrunedQwenProcessorMixin, received_saliency


class PromPruneQwen2VLMultiModalProcessor(PrunedQwenProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


def qwen_tower_outputs(
    visual: Qwen2VisionTransformer, pixel_values: torch.Tensor, grid_thw: list[list[int]], saliency: Sequence[bool]
) -> tuple[list[TowerOutput], list[torch.Tensor]]:
    """Per image: pruning inputs (`merged_tower_outputs`, saliency from the last
    block where `saliency` asks for it, features from the stock embeddings) and the
    stock merged embeddings [N, D].

    `Qwen2VisionTransformer.forward` of vLLM 0.32, step for step, keeping the
    last block's input (for its q and k) and the merger's input.
    """
    metadata = visual.prepare_encoder_metadata(grid_thw)
    hidden = visual.patch_embed(visual.input_norm(pixel_values.to(device=visual.device), visual.dtype)).unsqueeze(1)
    for block in visual.blocks:
        block_input = hidden
        hidden = block(
            hidden,
            cu_seqlens=metadata["cu_seqlens"],
            rotary_pos_emb_cos=metadata["rotary_pos_emb_cos"],
            rotary_pos_emb_sin=metadata["rotary_pos_emb_sin"],
            max_seqlen=metadata["max_seqlen"],
        )
    embeddings = visual.merger(hidden)

    attention = visual.blocks[-1].attn

    def query_key() -> tuple[torch.Tensor, torch.Tensor]:
        qkv, _ = attention.qkv(visual.blocks[-1].norm1(block_input))
        query, key, _ = attention.split_qkv(qkv)  # [L, 1, H, d] each, this rank's heads
        rotated = attention.apply_rotary_emb(
            torch.cat([query, key], dim=1).transpose(0, 1).contiguous(),
            metadata["rotary_pos_emb_cos"],
            metadata["rotary_pos_emb_sin"],
        )
        return rotated[0], rotated[1]

    received = received_saliency(attention, query_key, grid_thw, saliency)
    unit = visual.spatial_merge_size**2
    sizes = [t * h * w // unit for t, h, w in grid_thw]
    return raster_tower_outputs(received, hidden, unit, sizes, embeddings), list(embeddings.split(sizes))


@MULTIMODAL_REGISTRY.register_processor(
    PromPruneQwen2VLMultiModalProcessor,
    info=Qwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class PromPruneQwen2VLForConditionalGeneration(PrunedQwenMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose image embeddings are the K tokens the settings select."""

    family_name = "Qwen2-VL"
    image_key = "images"

    def tower_outputs(
        self, pixel_values: torch.Tensor, grid_thw: list[list[int]], saliency: Sequence[bool]
    ) -> tuple[list[TowerOutput], list[torch.Tensor]]:
        return qwen_tower_outputs(self.visual, pixel_values, grid_thw, saliency)
