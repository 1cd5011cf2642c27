"""The pruning template of the Qwen families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): kept
tokens at their true M-RoPE positions.

Saliency and the position scheme are described in `vllm_promprune.families.qwen_vision`.
In vLLM terms:

- `get_mrope_input_positions` (run when a request arrives) gives a pruned
  image's K slots the image's start position and every later token exactly
  the position the unpruned model gives it.
- `embed_multimodal` returns, for EVERY image and video, its rows plus
  `OFFSET_COLUMNS` columns holding each row's (t, h, w) grid offset (zero for
  unpruned items, whose slots already carry full grid positions). The columns
  travel with the rows through vLLM's encoder cache, so a chunked prefill that
  consumes an image over several steps gets each row's own offset.
- `embed_input_ids` strips the columns and remembers the offsets of this
  step's multimodal tokens; `forward` adds them in place to the positions
  tensor the runner passed (its persistent buffer, which CUDA graphs read).
- A prefix-cache hit that covers a whole image skips all of this: its keys are
  already cached, and the text after it was positioned at arrival.

A family module mixes `PrunedQwenMixin` first into vLLM's model class and
supplies `tower_outputs` (its tower's forward, replicated to read the saliency
block's input and the merger's input). A pruned image's rows are its kept rows of
the stock embeddings (the merger runs once); its saliency is computed only when
its selection reads it (`PruneSettings.reads_saliency`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems

from ...families.qwen_vision import (
    OFFSET_COLUMNS,
    QWEN_OPTION_DEFAULTS,
    QWEN_TOWER_INPUTS,
    QWEN_TOWER_NAME,
    Media,
    decode_offsets,
    encode_offsets,
    frame_bounds,
    grid_offsets,
    merger_projection,
    mrope_positions,
    received_attention,
)
from ...pruning import Instructions, TowerOutput, prune_towers_indexed
from ...settings import PruneSettings
from .common import (
    INSTRUCTION_FIELD,
    SELECTION_HOOKS,
    SETTINGS_FIELD,
    ImageGeometry,
    PruningProcessorMixin,
    language_model_embedding,
    making_dummy_inputs,
    memory_profile_marker,
    memory_profile_methods,
    profiled_items_per_batch,
    pruned_image_embeddings,
    run_memory_profile,
)

VIDEO_PROFILE_FIELD = "promprune_video_profile"
"""Per-video uint8 kwarg: empty, or on vLLM's profiling video a `memory_profile_marker`.
vLLM profiles the one modality with the most tokens per item; when that is video, the
image selections run on that video's tower output (cut to the largest image)."""


class PrunedQwenProcessorMixin(PruningProcessorMixin):
    """Mix first into a vLLM Qwen-VL multimodal processor: K placeholders per pruned image."""

    option_defaults = QWEN_OPTION_DEFAULTS
    tower_inputs = QWEN_TOWER_INPUTS
    tower_name = QWEN_TOWER_NAME

    mrope_cache_factor: ClassVar[int] = 4
    """vLLM's M-RoPE cos/sin cache holds max_position_embeddings x this positions (Qwen2/2.5-VL: 4;
    Qwen3-VL: 1 without vLLM's video pruning, which the pruned Qwen3-VL refuses)."""

    def num_images(self, processed_data: BatchFeature) -> int:
        grids = processed_data.get("image_grid_thw")
        return 0 if grids is None else len(grids)

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        grids = processed.get("video_grid_thw")
        num_videos = 0 if grids is None else len(grids)
        payload = memory_profile_marker(self.profiled_methods()) if making_dummy_inputs() else torch.empty(0, dtype=torch.uint8)
        processed[VIDEO_PROFILE_FIELD] = [payload.clone() for _ in range(num_videos)]
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[VIDEO_PROFILE_FIELD] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    def check_pruned_images(self, settings: Sequence[PruneSettings], out_mm_kwargs: MultiModalKwargsItems) -> None:
        """A pruned image keeps its full grid's positions (max(h, w) of them) on K tokens, so
        the request's later tokens sit up to sum(max(h, w) - K) positions further than in a
        prompt of the same length; generation may run to max_model_len. Refused here when
        that could pass the end of vLLM's position cache (an index error in the engine)."""
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        overshoot = 0
        for index, image_settings in enumerate(settings):
            _, height, width = (int(v) // merge for v in out_mm_kwargs["image"][index]["image_grid_thw"].data.tolist())
            kept = image_settings.placeholders(height * width, height * width)
            overshoot += max(0, max(height, width) - kept)
        model_config = self.info.ctx.model_config
        positions = model_config.hf_text_config.max_position_embeddings * self.mrope_cache_factor
        if model_config.max_model_len + overshoot > positions:
            raise ValueError(
                f"promprune.keep: these budgets keep fewer tokens than the images' grid sides, which moves "
                f"later tokens {overshoot} M-RoPE positions further; with max_model_len "
                f"{model_config.max_model_len} that can pass this model's {positions} positions: keep at least "
                f"max(grid height, grid width) tokens per image, or serve with --max-model-len "
                f"{positions - overshoot} or less"
            )


class PrunedQwenMixin:
    """Mix first into a vLLM Qwen-VL model class: image embeddings are the K tokens the
    settings select, every item's rows carry their M-RoPE offsets."""

    # vLLM's runners rewrite positions for EVS-pruned videos when a model declares
    # this (GPU only); this model positions every item itself, on every device.
    supports_multimodal_pruning = False

    family_name: ClassVar[str]
    image_key: ClassVar[str] = "image"
    """The key of the image input in `_parse_and_validate_multimodal_inputs` (Qwen2-VL: "images")."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.use_data_parallel:
            raise ValueError(f"pruned {self.family_name} does not support mm_encoder_tp_mode='data'")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            # Position offsets are read from the embeddings on the first stage only.
            raise ValueError(f"pruned {self.family_name} does not support pipeline parallelism")
        info = MULTIMODAL_REGISTRY.get_processing_info(self.model_config)
        self.max_image_tokens = info.get_max_image_tokens()
        merge_unit = self.visual.spatial_merge_size**2
        self.profiled_images = profiled_items_per_batch(vllm_config, self.max_image_tokens)
        self.encoder_patch_budget = self.profiled_images * self.max_image_tokens * merge_unit
        self._pending_offsets: _PendingOffsets | None = None

    def tower_outputs(
        self, pixel_values: torch.Tensor, grid_thw: list[list[int]], saliency: Sequence[bool]
    ) -> tuple[list[TowerOutput], list[torch.Tensor]]:
        """Per image: pruning inputs (`merged_tower_outputs`: features from the stock
        embeddings, saliency only where `saliency` says its selection reads it) and the
        stock merged embeddings [N, D]."""
        raise NotImplementedError

    def kept_rows(self, projected: torch.Tensor, kept: torch.Tensor, stock_rows: torch.Tensor) -> torch.Tensor:
        """An image's embedding rows for its `kept` tokens: the merger's projection of
        them, `projected` [K, D] (Qwen3-VL adds its deepstack columns from `stock_rows`)."""
        return projected

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
        # No read of the device here: whether any row carries a nonzero offset is not asked
        # (unpruned rows add zeros). The runner's `is_multimodal` mask lives on the host.
        slots = is_multimodal.nonzero().squeeze(1)
        if len(slots) != len(offsets):
            raise AssertionError(f"{len(slots)} multimodal slots for {len(offsets)} embedding rows")
        self._pending_offsets = _PendingOffsets(
            slots.to(offsets.device, non_blocking=True), offsets.T, input_ids.shape[0]
        )
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
            # In place, into the runner's own buffer: CUDA graphs replay against the
            # addresses they captured and would never read a new tensor. The runner
            # rewrites every scheduled token's position before each step.
            positions[:, pending.slots] += pending.offsets
        return super().forward(input_ids, positions, *args, **kwargs)

    # -- embeddings -------------------------------------------------------

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        field = kwargs.pop(SETTINGS_FIELD, None)
        instruction_field = kwargs.pop(INSTRUCTION_FIELD, None)
        video_profile = kwargs.pop(VIDEO_PROFILE_FIELD, None)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        embeddings: list[torch.Tensor] = []
        for modality, modality_input in inputs.items():
            if modality == self.image_key:
                embeddings.extend(self._image_rows(modality_input, field, instruction_field))
            else:
                embeddings.extend(self._video_rows(modality_input))
                methods = None if video_profile is None else memory_profile_methods(video_profile[0])
                if methods is not None:
                    self._profile_on_video(modality_input, methods)
        return embeddings

    def _profile_on_video(self, video_input: Any, methods: Sequence[str]) -> None:
        """vLLM's memory profile ran on a video: run the image selections on its first
        video's tower output cut to the largest image's tokens, as many images at once as
        an encoder micro-batch holds (the video has at least as many tokens: vLLM profiles
        the modality with the most)."""
        grid = video_input["video_grid_thw"][:1].tolist()
        patches = grid[0][0] * grid[0][1] * grid[0][2]
        (tower,), _ = self.tower_outputs(video_input["pixel_values_videos"][:patches], grid, [True])
        tokens = min(self.max_image_tokens, tower.saliency.shape[1])
        count = self.profiled_images
        images = TowerOutput(
            tower.hidden[:, : tokens + 1].expand(count, -1, -1),
            tower.saliency[:, :tokens].expand(count, -1),
            None,
            None if tower.features is None else tower.features[:, :tokens].expand(count, -1, -1),
        )
        project = merger_projection(self.visual.merger)

        def embed(start: int, stop: int, settings: Sequence[PruneSettings], instructions: Instructions) -> list[torch.Tensor]:
            pruned = prune_towers_indexed(
                [images.rows(start, stop)], settings, project, **SELECTION_HOOKS, instructions=instructions
            )
            return [image.rows for image in pruned]

        geometry = [ImageGeometry(tokens, tokens, tower_cost=1)] * self.profiled_images
        run_memory_profile(methods, geometry, self.profiled_images, embed, language_model_embedding(self))

    def _video_rows(self, video_input: Any) -> list[torch.Tensor]:
        """Videos as stock vLLM embeds them (not pruned by the plugin), with zero offsets."""
        return [with_offsets(rows, None) for rows in self._process_video_input(video_input)]

    def _image_rows(self, image_input: Any, field: Any, instruction_field: Any) -> list[torch.Tensor]:
        if image_input["type"] != "pixel_values":  # embeddings given: nothing to prune
            return [with_offsets(rows, None) for rows in self._process_image_input(image_input)]
        grid_thw = image_input["image_grid_thw"].tolist()
        merge = self.visual.spatial_merge_size
        patch_counts = [t * h * w for t, h, w in grid_thw]
        sizes = [count // (merge * merge) for count in patch_counts]
        project = merger_projection(self.visual.merger)

        def embed(start: int, stop: int, settings: Sequence[PruneSettings], instructions: Instructions) -> list[torch.Tensor]:
            first_patch = sum(patch_counts[:start])
            pixels = image_input["pixel_values"][first_patch : first_patch + sum(patch_counts[start:stop])]
            reads_saliency = [settings[i].reads_saliency(sizes[image]) for i, image in enumerate(range(start, stop))]
            towers, stock = self.tower_outputs(pixels, grid_thw[start:stop], reads_saliency)
            pruning = [i for i, image in enumerate(range(start, stop)) if settings[i].prunes(sizes[image])]
            # Images of equal N (and equal settings) select as one batch.
            selected = dict(zip(pruning, prune_towers_indexed(
                [towers[i] for i in pruning], [settings[i] for i in pruning], project, **SELECTION_HOOKS,
                instructions=[instructions[i] for i in pruning],
            ), strict=True))
            rows = []
            for i, stock_rows in enumerate(stock):
                if i not in selected:
                    rows.append(with_offsets(stock_rows, None))
                    continue
                pruned = selected[i]
                kept_rows = self.kept_rows(pruned.rows, pruned.kept, stock_rows)
                rows.append(with_offsets(kept_rows, grid_offsets(pruned.kept, grid_thw[start + i][2] // merge)))
            return rows

        def stock() -> list[torch.Tensor]:
            return [with_offsets(rows, None) for rows in self._process_image_input(image_input)]

        geometry = [ImageGeometry(size, size, count) for size, count in zip(sizes, patch_counts)]
        return pruned_image_embeddings(
            field, geometry, self.encoder_patch_budget, stock, embed, instruction_field, language_model_embedding(self)
        )



def rotated_query_key(
    block: torch.nn.Module, block_input: torch.Tensor, metadata: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rotated query and key [L, H_rank, d] at a vLLM vision block whose
    attention is `Qwen2_5_VisionAttention` (Qwen2.5-VL, Qwen3-VL), as its forward computes
    them from the block's input [L, 1, Dv]."""
    attention = block.attn
    heads, head_dim = attention.num_attention_heads_per_partition, attention.hidden_size_per_attention_head
    qkv, _ = attention.qkv(block.norm1(block_input))
    qkv = qkv.view(qkv.shape[0], 3, heads, head_dim)
    rotated = attention.apply_rotary_emb(
        qkv[:, :2].transpose(0, 1).contiguous(), metadata["rotary_pos_emb_cos"], metadata["rotary_pos_emb_sin"]
    )
    return rotated[0], rotated[1]


def received_saliency(
    attention: torch.nn.Module,
    query_key: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    grid_thw: list[list[int]],
    wanted: Sequence[bool],
) -> list[torch.Tensor | None]:
    """Per image, the attention each of its t*h*w patches receives at a vLLM Qwen vision
    attention block (tower row order), averaged over ALL heads (all-reduced over
    tensor-parallel ranks, which hold disjoint head shards); None for images not `wanted`.

    `query_key()` gives this rank's rotated query and key [L, H_rank, d]; it is not called
    when no image is wanted (every rank decides alike: all see the same settings).
    """
    if not any(wanted):
        return [None] * len(grid_thw)
    query, key = query_key()
    heads, head_dim = attention.num_attention_heads_per_partition, attention.hidden_size_per_attention_head
    counts = [t * h * w for t, h, w in grid_thw]
    parts, first = [], 0
    for grid, count, image_wanted in zip(grid_thw, counts, wanted, strict=True):
        if image_wanted:
            rows = slice(first, first + count)
            parts.append(received_attention(query[rows], key[rows], frame_bounds([grid]), head_dim**-0.5))
        first += count
    received = torch.cat(parts)
    if attention.tp_size > 1:
        received = tensor_model_parallel_all_reduce(received * heads) / (heads * attention.tp_size)
    per_image = iter(received.split([count for count, image_wanted in zip(counts, wanted) if image_wanted]))
    return [next(per_image) if image_wanted else None for image_wanted in wanted]


class _PendingOffsets(NamedTuple):
    """M-RoPE offsets from `embed_input_ids`, for the forward of the same step."""

    slots: torch.Tensor  # [M] indices of the step's multimodal tokens
    offsets: torch.Tensor  # [3, M] (t, h, w) offsets added to their positions
    num_tokens: int  # tokens of the step that embedded them


def with_offsets(rows: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """`rows` [K, D] plus OFFSET_COLUMNS columns encoding [K, 3] offsets (None: zeros)."""
    if offsets is None:
        columns = rows.new_zeros(rows.shape[0], OFFSET_COLUMNS)
    else:
        columns = encode_offsets(offsets.to(rows.device), rows.dtype)
    return torch.cat([rows, columns], dim=1)
