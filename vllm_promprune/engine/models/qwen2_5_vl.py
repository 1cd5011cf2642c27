"""Pruned Qwen2.5-VL: the Qwen template (`models/qwen.py`) on Qwen2.5-VL's windowed tower.

Saliency comes from the last full-attention block (`max(fullatt_block_indexes)`),
scores and merger inputs mapped from window order back to raster order.

Videos are not pruned by this plugin. With vLLM's own `--video-pruning-rate`
(EVS) the video rows EVS keeps carry their grid offsets the same way as pruned
images, so EVS videos get exact positions too. The model declares no
`SupportsMultiModalPruning` to vLLM's runners, so their own EVS position rewrite
(GPU only, and unaware of pruned images) never runs: the same path serves CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
    cast_overflow_tensors,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune.evs import compute_retention_mask

from ...families.qwen_vision import Media, merged_tower_outputs
from ...pruning import TowerOutput
from .qwen import PrunedQwenMixin, PrunedQwenProcessorMixin, received_saliency, rotated_query_key, with_offsets


class PromPruneQwen2_5_VLMultiModalProcessor(PrunedQwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


def qwen_tower_outputs(
    visual: Qwen2_5_VisionTransformer, pixel_values: torch.Tensor, grid_thw: list[list[int]], saliency: Sequence[bool]
) -> tuple[list[TowerOutput], list[torch.Tensor]]:
    """Per image: pruning inputs and the stock merged embeddings [N, D] (raster order).

    TowerOutput rows are merged tokens: `hidden` [1, N + 1, 4 * Dv] is the
    merger's input (row 0 is a zero placeholder: there is no CLS), `saliency`
    [1, N] is the attention received at the last full-attention block, pooled
    per merge group (None for images whose `saliency` entry is False), `features`
    are the stock embeddings. The embeddings are exactly the stock tower's output.
    """
    metadata = visual.prepare_encoder_metadata(grid_thw)
    embeddings, block_input, merger_input = _visual_forward(visual, pixel_values, metadata)
    block = visual.blocks[max(visual.fullatt_block_indexes)]
    received = received_saliency(block.attn, lambda: rotated_query_key(block, block_input, metadata), grid_thw, saliency)

    unit = visual.spatial_merge_unit
    sizes = [t * h * w // unit for t, h, w in grid_thw]
    patches = merger_input.reshape(-1, merger_input.shape[-1])
    towers = merged_tower_outputs(received, patches, metadata["reverse_indices"], unit, sizes, embeddings)
    return towers, list(embeddings.split(sizes))


def _visual_forward(
    visual: Qwen2_5_VisionTransformer, pixel_values: torch.Tensor, metadata: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Qwen2_5_VisionTransformer.forward` of vLLM 0.32, step for step, also returning
    the input of the last full-attention block and of the merger (window order).

    Module hooks cannot observe these: vLLM's compile decorator calls `forward`
    directly, bypassing `nn.Module.__call__`.
    """
    hidden = visual.patch_embed(visual.input_norm(pixel_values.to(device=visual.device), visual.dtype))
    length = hidden.shape[0]
    unit = visual.spatial_merge_unit
    hidden = hidden.reshape(length // unit, unit, -1)[metadata["window_index"]].reshape(length, -1).unsqueeze(1)
    saliency_block = max(visual.fullatt_block_indexes)
    block_input = hidden
    for index, block in enumerate(visual.blocks):
        full = index in visual.fullatt_block_indexes
        if index == saliency_block:
            block_input = hidden
        hidden = block(
            hidden,
            cu_seqlens=metadata["cu_seqlens" if full else "cu_window_seqlens"],
            rotary_pos_emb_cos=metadata["rotary_pos_emb_cos"],
            rotary_pos_emb_sin=metadata["rotary_pos_emb_sin"],
            max_seqlen=metadata["max_seqlen_full" if full else "max_seqlen_window"],
            sequence_lengths=metadata.get("sequence_lengths_full" if full else "sequence_lengths_window"),
        )
    if hidden.dtype == torch.float16:
        hidden = cast_overflow_tensors(hidden)
    embeddings = visual.merger(hidden)[metadata["reverse_indices"]]
    return embeddings, block_input, hidden


@MULTIMODAL_REGISTRY.register_processor(
    PromPruneQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PromPruneQwen2_5_VLForConditionalGeneration(PrunedQwenMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image embeddings are the K tokens the settings select."""

    family_name = "Qwen2.5-VL"

    def tower_outputs(
        self, pixel_values: torch.Tensor, grid_thw: list[list[int]], saliency: Sequence[bool]
    ) -> tuple[list[TowerOutput], list[torch.Tensor]]:
        return qwen_tower_outputs(self.visual, pixel_values, grid_thw, saliency)

    def _video_rows(self, video_input: Any) -> list[torch.Tensor]:
        videos = self._process_video_input(video_input)
        if not self.is_multimodal_pruning_enabled:
            return [with_offsets(rows, None) for rows in videos]
        # vLLM's EVS keeps the rows `compute_retention_mask` selects. Their offsets are
        # the unpruned video's grid positions, with the same float time factor as
        # `get_mrope_input_positions` (vLLM's own EVS column casts second_per_grid_ts to
        # an integer first). A video EVS keeps whole (a single temporal patch) is
        # positioned like an unpruned one: its slots already carry grid positions.
        merge = self.visual.spatial_merge_size
        seconds = video_input.get("second_per_grid_ts")
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        rows_out = []
        for index, (rows, (t, h, w)) in enumerate(zip(videos, video_input["video_grid_thw"].tolist())):
            kept = compute_retention_mask(rows, (t, h, w), spatial_merge_size=merge, q=self.video_pruning_rate)
            if bool(kept.all()):
                rows_out.append(with_offsets(rows, None))
                continue
            t_factor = (1.0 if seconds is None else float(seconds[index])) * tokens_per_second
            cells = Media(0, 0, (t, h // merge, w // merge), t_factor).grid_positions()
            rows_out.append(with_offsets(rows[kept], cells[:, kept.cpu()].T))
        return rows_out
