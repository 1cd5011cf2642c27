"""Pruned Qwen2.5-VL: selection after the vision tower, kept tokens at their true M-RoPE positions.

Saliency, block choice and the position scheme are described in
`vllm_promprune.families.qwen_vision`. In vLLM terms:

- `get_mrope_input_positions` (run when a request arrives) gives a pruned
  image's K slots the image's start position and every later token exactly
  the position the unpruned model gives it.
- `embed_multimodal` returns, for EVERY image and video, its rows plus
  `OFFSET_COLUMNS` columns holding each row's (t, h, w) grid offset (zero for
  unpruned items, whose slots already carry full grid positions). The columns
  travel with the rows through vLLM's encoder cache, so a chunked prefill that
  consumes an image over several steps gets each row's own offset.
- `embed_input_ids` strips the columns and remembers the offsets of this
  step's multimodal tokens; `forward` adds them to the positions.
- A prefix-cache hit that covers a whole image skips all of this: its keys are
  already cached, and the text after it was positioned at arrival.

Videos are not pruned by this plugin. With vLLM's own `--video-pruning-rate`
(EVS) the video rows EVS keeps carry their grid offsets the same way, so EVS
videos get exact positions too. The model declares no `SupportsMultiModalPruning`
to vLLM's runners, so their own EVS position rewrite (GPU only, and unaware of
pruned images) never runs: the same path serves CPU and GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
    cast_overflow_tensors,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.multimodal.video_prune.evs import compute_retention_mask

from ...families.qwen_vision import (
    OFFSET_COLUMNS,
    QWEN_OPTION_DEFAULTS,
    QWEN_TOWER_INPUTS,
    QWEN_TOWER_NAME,
    Media,
    decode_offsets,
    encode_offsets,
    grid_offsets,
    merged_tower_outputs,
    merger_projection,
    mrope_positions,
    received_attention,
)
from ...pruning import TowerOutput, prune_images_indexed
from ...settings import PruneSettings
from .common import (
    SELECTION_HOOKS,
    SETTINGS_FIELD,
    ImageGeometry,
    PruningProcessorMixin,
    profiled_items_per_batch,
    pruned_image_embeddings,
)


class PromPruneQwen2_5_VLMultiModalProcessor(PruningProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    option_defaults = QWEN_OPTION_DEFAULTS
    tower_inputs = QWEN_TOWER_INPUTS
    tower_name = QWEN_TOWER_NAME

    def num_images(self, processed_data: BatchFeature) -> int:
        grids = processed_data.get("image_grid_thw")
        return 0 if grids is None else len(grids)


def qwen_tower_outputs(
    visual: Qwen2_5_VisionTransformer, pixel_values: torch.Tensor, grid_thw: list[list[int]]
) -> tuple[list[TowerOutput], list[torch.Tensor]]:
    """Per image: pruning inputs and the stock merged embeddings [N, D] (raster order).

    TowerOutput rows are merged tokens: `hidden` [1, N + 1, 4 * Dv] is the
    merger's input (row 0 is a zero placeholder: there is no CLS), `saliency`
    [1, N] is the attention received at the last full-attention block, pooled
    per merge group. The embeddings are exactly the stock tower's output.
    """
    metadata = visual.prepare_encoder_metadata(grid_thw)
    embeddings, block_input, merger_input = _visual_forward(visual, pixel_values, metadata)
    block = visual.blocks[max(visual.fullatt_block_indexes)]
    attention = block.attn
    heads, head_dim = attention.num_attention_heads_per_partition, attention.hidden_size_per_attention_head
    qkv, _ = attention.qkv(block.norm1(block_input))
    qkv = qkv.view(qkv.shape[0], 3, heads, head_dim)
    rotated = attention.apply_rotary_emb(
        qkv[:, :2].transpose(0, 1).contiguous(),
        metadata["rotary_pos_emb_cos"],
        metadata["rotary_pos_emb_sin"],
    )
    received = received_attention(rotated[0], rotated[1], metadata["cu_seqlens"].tolist(), head_dim**-0.5)
    if attention.tp_size > 1:  # heads sharded over tensor-parallel ranks
        received = tensor_model_parallel_all_reduce(received * heads) / (heads * attention.tp_size)

    unit = visual.spatial_merge_unit
    sizes = [t * h * w // unit for t, h, w in grid_thw]
    patches = merger_input.reshape(-1, merger_input.shape[-1])
    towers = merged_tower_outputs(received, patches, metadata["reverse_indices"], unit, sizes)
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
class PromPruneQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image embeddings are the K tokens the settings select."""

    # vLLM's runners rewrite positions for EVS-pruned videos when a model declares
    # this (GPU only); this model positions every item itself, on every device.
    supports_multimodal_pruning = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.use_data_parallel:
            raise ValueError("pruned Qwen2.5-VL does not support mm_encoder_tp_mode='data'")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            # Position offsets are read from the embeddings on the first stage only.
            raise ValueError("pruned Qwen2.5-VL does not support pipeline parallelism")
        info = MULTIMODAL_REGISTRY.get_processing_info(self.model_config)
        max_tokens = info.get_max_image_tokens()
        self.encoder_patch_budget = (
            profiled_items_per_batch(vllm_config, max_tokens) * max_tokens * self.visual.spatial_merge_unit
        )
        self._pending_offsets: _PendingOffsets | None = None

    # -- positions --------------------------------------------------------

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        ordered = sorted(mm_features, key=lambda feature: feature.mm_position.offset)
        media = [
            Media(offset, feature.mm_position.length, (t, h, w), t_factor)
            for feature, (offset, t, h, w, t_factor) in zip(ordered, self.iter_mm_grid_thw(mm_features))
        ]
        return mrope_positions(len(input_tokens), media)

    def get_encoder_cudagraph_config(self):  # noqa: ANN201
        # Encoder CUDA graphs bypass embed_multimodal, whose rows carry the offset
        # columns embed_input_ids expects: run the tower eagerly for every modality.
        return dataclasses.replace(super().get_encoder_cudagraph_config(), modalities=[])

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._pending_offsets = None
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        offsets = decode_offsets(torch.cat([rows[:, -OFFSET_COLUMNS:] for rows in multimodal_embeddings]))
        if offsets.any():
            slots = is_multimodal.nonzero().squeeze(1)
            if len(slots) != len(offsets):
                raise AssertionError(f"{len(slots)} multimodal slots for {len(offsets)} embedding rows")
            self._pending_offsets = _PendingOffsets(slots, offsets.T.to(is_multimodal.device), input_ids.shape[0])
        stripped = [rows[:, :-OFFSET_COLUMNS] for rows in multimodal_embeddings]
        return super().embed_input_ids(input_ids, stripped, is_multimodal=is_multimodal)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, *args: Any, **kwargs: Any):  # noqa: ANN201
        if self._pending_offsets is not None:
            pending, self._pending_offsets = self._pending_offsets, None
            # The runner pads a step's tokens for the forward (never truncates them): a
            # forward shorter than the step whose embeddings set the offsets is another step.
            if positions.shape[-1] < pending.num_tokens:
                raise AssertionError(
                    f"M-RoPE offsets of a {pending.num_tokens}-token step reached a forward of "
                    f"{positions.shape[-1]} tokens"
                )
            positions = positions.clone()
            positions[:, pending.slots] += pending.offsets
        return super().forward(input_ids, positions, *args, **kwargs)

    # -- embeddings -------------------------------------------------------

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        field = kwargs.pop(SETTINGS_FIELD, None)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        embeddings: list[torch.Tensor] = []
        for modality, modality_input in inputs.items():
            if modality == "image":
                embeddings.extend(self._image_rows(modality_input, field))
            else:
                embeddings.extend(self._video_rows(modality_input))
        return embeddings

    def _video_rows(self, video_input: Any) -> list[torch.Tensor]:
        videos = self._process_video_input(video_input)
        if not self.is_multimodal_pruning_enabled:
            return [_with_offsets(rows, None) for rows in videos]
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
                rows_out.append(_with_offsets(rows, None))
                continue
            t_factor = (1.0 if seconds is None else float(seconds[index])) * tokens_per_second
            cells = Media(0, 0, (t, h // merge, w // merge), t_factor).grid_positions()
            rows_out.append(_with_offsets(rows[kept], cells[:, kept.cpu()].T))
        return rows_out

    def _image_rows(self, image_input: Any, field: Any) -> list[torch.Tensor]:
        if image_input["type"] != "pixel_values":  # embeddings given: nothing to prune
            return [_with_offsets(rows, None) for rows in self._process_image_input(image_input)]
        grid_thw = image_input["image_grid_thw"].tolist()
        merge = self.visual.spatial_merge_size
        patch_counts = [t * h * w for t, h, w in grid_thw]
        sizes = [count // (merge * merge) for count in patch_counts]
        project = merger_projection(self.visual.merger)

        def embed(start: int, stop: int, settings: Sequence[PruneSettings]) -> list[torch.Tensor]:
            first_patch = sum(patch_counts[:start])
            pixels = image_input["pixel_values"][first_patch : first_patch + sum(patch_counts[start:stop])]
            towers, stock = qwen_tower_outputs(self.visual, pixels, grid_thw[start:stop])
            rows = []
            for image, tower, stock_rows, image_settings in zip(range(start, stop), towers, stock, settings):
                if not image_settings.prunes(sizes[image]):
                    rows.append(_with_offsets(stock_rows, None))
                    continue
                (pruned,) = prune_images_indexed(tower, [image_settings], project, **SELECTION_HOOKS)
                rows.append(_with_offsets(pruned.rows, grid_offsets(pruned.kept, grid_thw[image][2] // merge)))
            return rows

        def stock() -> list[torch.Tensor]:
            return [_with_offsets(rows, None) for rows in self._process_image_input(image_input)]

        geometry = [ImageGeometry(size, size, count) for size, count in zip(sizes, patch_counts)]
        return pruned_image_embeddings(field, geometry, self.encoder_patch_budget, stock, embed)


class _PendingOffsets(NamedTuple):
    """M-RoPE offsets from `embed_input_ids`, for the forward of the same step."""

    slots: torch.Tensor  # [M] indices of the step's multimodal tokens
    offsets: torch.Tensor  # [3, M] (t, h, w) offsets added to their positions
    num_tokens: int  # tokens of the step that embedded them


def _with_offsets(rows: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """`rows` [K, D] plus OFFSET_COLUMNS columns encoding [K, 3] offsets (None: zeros)."""
    if offsets is None:
        columns = rows.new_zeros(rows.shape[0], OFFSET_COLUMNS)
    else:
        columns = encode_offsets(offsets.to(rows.device), rows.dtype)
    return torch.cat([rows, columns], dim=1)
