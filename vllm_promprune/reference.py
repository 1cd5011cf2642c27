"""Plain-transformers reference: LLaVA, LLaVA-NeXT and the Qwen-VL families with the same token selection, no vLLM.

Two uses: the tests check that vLLM's pruned output equals this forward, and
researchers can apply the selection methods to HF LLaVA models directly.
Saliency here comes from transformers' own attention probabilities
(`output_attentions=True`, eager attention), not from the recomputation the
vLLM path uses, so agreement checks that recomputation too.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .families.anyres import anyres_layout, prune_anyres
from .families.qwen_vision import QWEN_OPTION_DEFAULTS, merged_tower_outputs, merger_projection, received_attention
from .pruning import Instructions, TowerOutput, instruction_tokens, non_instruction_ids, prune_images, prune_towers_indexed
from .settings import PruneSettings, parse_image_settings


def instruction_embeddings(
    model, processor, prompt_ids: Sequence[int], settings: Sequence[PruneSettings]  # noqa: ANN001 (transformers types)
) -> list[torch.Tensor | None]:
    """Per image: the prompt's instruction embedded by the LLM's input embedding table
    (float32 [M, D]) where its settings read one (CDPruner), else None; as the engine does."""
    if not any(image_settings.reads_instruction for image_settings in settings):
        return [None] * len(settings)
    ids = instruction_tokens(prompt_ids, non_instruction_ids(processor.tokenizer, model.config))
    embedded = model.get_input_embeddings()(torch.tensor(ids, dtype=torch.int64)).float()
    return [embedded if image_settings.reads_instruction else None for image_settings in settings]


class PrunedLlavaReference:
    """Wraps an HF `LlavaForConditionalGeneration` loaded with attn_implementation="eager"."""

    def __init__(self, model, processor) -> None:  # noqa: ANN001 (transformers types)
        if model.config.vision_feature_select_strategy != "default" or not isinstance(
            model.config.vision_feature_layer, int
        ):
            raise ValueError("the reference supports one vision_feature_layer with strategy 'default'")
        self.model = model.eval()
        self.processor = processor
        self.config = model.config

    @torch.inference_mode()
    def tower_output(self, pixel_values: torch.Tensor) -> TowerOutput:
        """Selected-layer hidden states, head-mean CLS attention and keys, from transformers."""
        out = self.model.model.vision_tower(
            pixel_values, output_hidden_states=True, output_attentions=True
        )
        hidden_index = self.config.vision_feature_layer % len(out.hidden_states)
        # hidden_states[i] is the output of encoder layer i - 1 (0 is the embeddings).
        layer = self.model.model.vision_tower.encoder.layers[hidden_index - 1]
        attention = out.attentions[hidden_index - 1]  # [B, H, N+1, N+1]
        layer_input = layer.layer_norm1(out.hidden_states[hidden_index - 1])
        batch, length, _ = layer_input.shape
        heads = layer.self_attn.num_heads
        keys = layer.self_attn.k_proj(layer_input).float().view(batch, length, heads, -1).mean(dim=2)
        return TowerOutput(
            hidden=out.hidden_states[hidden_index],
            saliency=attention[:, :, 0, 1:].float().mean(dim=1),
            keys=keys,
        )

    def pixel_values(self, images: Sequence[object]) -> torch.Tensor:
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return pixel_values.to(self.model.dtype)

    @torch.inference_mode()
    def split_inputs(self, image: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What PromPrune's split and adaptive budgets see for one image: pre-projector patch
        tokens [N, Dv], projected tokens [N, D] and saliency [N]."""
        tower = self.tower_output(self.pixel_values([image]))
        patches = tower.hidden[0, 1:]
        return patches, self.model.model.multi_modal_projector(patches), tower.saliency[0]

    @torch.inference_mode()
    def pruned_embeddings(
        self, images: Sequence[object], settings: Sequence[PruneSettings], instructions: Instructions | None = None
    ) -> list[torch.Tensor]:
        """The LLM's image embeddings, one [K_i, D] tensor per image."""
        tower = self.tower_output(self.pixel_values(images))
        return prune_images(tower, settings, self.model.model.multi_modal_projector, instructions=instructions)

    @torch.inference_mode()
    def greedy(
        self,
        prompt_ids: Sequence[int],
        images: Sequence[object],
        settings: Mapping[str, object] | None = None,
        max_new_tokens: int = 8,
    ) -> tuple[list[int], list[int]]:
        """Greedy decode with pruned images; no early stop at EOS.

        Args:
            prompt_ids: token ids with ONE image token per image (unexpanded).
            images: PIL images, in prompt order.
            settings: the request's `promprune` settings (None: keep all); `keep`
                or `ratio` may be a list with one budget per image.

        Returns:
            (expanded prompt ids, generated token ids).
        """
        image_token = self.config.image_token_index
        image_settings = parse_image_settings(settings, len(images))
        instructions = instruction_embeddings(self.model, self.processor, prompt_ids, image_settings)
        kept = self.pruned_embeddings(images, image_settings, instructions)
        if sum(1 for t in prompt_ids if t == image_token) != len(kept):
            raise ValueError("prompt must contain exactly one image token per image")

        rows_per_image = iter(rows.shape[0] for rows in kept)
        expanded: list[int] = []
        for token in prompt_ids:
            expanded.extend([token] * (next(rows_per_image) if token == image_token else 1))
        ids = torch.tensor([expanded])
        embeds = self.model.get_input_embeddings()(ids)
        embeds[0, ids[0] == image_token] = torch.cat(kept).to(embeds.dtype)

        return expanded, greedy_decode(self.model, embeds, max_new_tokens)


def greedy_decode(
    model,  # noqa: ANN001
    embeds: torch.Tensor,
    max_new_tokens: int,
    positions: torch.Tensor | None = None,
    **prefill: object,
) -> list[int]:
    """Greedy tokens after a prompt given as embeddings [1, L, D]; no early stop at EOS.

    `positions` [3, L] are M-RoPE positions (Qwen-VL); generated tokens then
    continue from their maximum + 1 in all three dimensions, as in transformers.
    `prefill`: further language-model inputs of the prompt's forward (Qwen3-VL's deepstack).
    """
    language_model = model.model.language_model

    next_position = None if positions is None else int(positions.max()) + 1
    out = language_model(
        inputs_embeds=embeds, position_ids=None if positions is None else positions[:, None], use_cache=True, **prefill
    )
    generated: list[int] = []
    for step in range(max_new_tokens):
        next_token = model.lm_head(out.last_hidden_state[:, -1]).argmax(dim=-1)
        generated.append(int(next_token))
        out = language_model(
            input_ids=next_token[:, None],
            position_ids=None if positions is None else torch.full((3, 1, 1), next_position + step),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return generated


class PrunedLlavaNextReference(PrunedLlavaReference):
    """Wraps an HF `LlavaNextForConditionalGeneration` loaded with attn_implementation="eager".

    Unpruned images use transformers' own `pack_image_features` (unpad + newlines);
    pruned images use `anyres.prune_anyres` on the same tower outputs.
    """

    @torch.inference_mode()
    def split_inputs(self, image: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The image's content tokens (base view + unpadded grid, `budget_mode: global`):
        pre-projector [N, Dv], projected [N, D] and each view's own CLS attention [N]."""
        processed = self.processor.image_processor([image], return_tensors="pt")
        height, width = processed["image_sizes"][0].tolist()
        vision = self.config.vision_config
        layout = anyres_layout(height, width, self.config.image_grid_pinpoints, vision.image_size, vision.patch_size)
        tower = self.tower_output(processed["pixel_values"][0, : layout.num_views].to(self.model.dtype))
        patches = tower.hidden[:, 1:].flatten(0, 1)[layout.content_index]
        return patches, self.model.model.multi_modal_projector(patches), tower.saliency.flatten()[layout.content_index]

    @torch.inference_mode()
    def pruned_embeddings(
        self, images: Sequence[object], settings: Sequence[PruneSettings], instructions: Instructions | None = None
    ) -> list[torch.Tensor]:
        processed = self.processor.image_processor(images, return_tensors="pt")
        instructions = instructions or [None] * len(settings)
        projector = self.model.model.multi_modal_projector
        vision = self.config.vision_config
        embeddings = []
        for pixel_values, size, image_settings, instruction in zip(
            processed["pixel_values"], processed["image_sizes"], settings, instructions
        ):
            height, width = size.tolist()
            layout = anyres_layout(height, width, self.config.image_grid_pinpoints, vision.image_size, vision.patch_size)
            tower = self.tower_output(pixel_values[: layout.num_views].to(self.model.dtype))
            if image_settings.prunes(layout.num_content):
                embeddings.append(prune_anyres(tower, layout, image_settings, projector, instruction=instruction))
            else:
                (packed,), _ = self.model.model.pack_image_features(
                    [projector(tower.hidden[:, 1:])], size[None], "default", self.model.model.image_newline
                )
                embeddings.append(packed)
        return embeddings


class PrunedQwen2VLReference:
    """Wraps an HF `Qwen2VLForConditionalGeneration` (or, as the subclass, Qwen2.5-VL)
    loaded with attn_implementation="eager".

    Saliency comes from transformers' own vision blocks (the saliency block's
    input captured by hooks, merge groups put in raster order), and the pruned
    prompt's positions are transformers' `get_rope_index` positions of the
    UNPRUNED prompt with the dropped image tokens' columns removed, so
    agreement with vLLM checks vLLM's position scheme independently.
    """

    modeling = "transformers.models.qwen2_vl.modeling_qwen2_vl"
    """The transformers module whose `apply_rotary_pos_emb_vision` the tower uses."""

    def __init__(self, model, processor) -> None:  # noqa: ANN001 (transformers types)
        self.model = model.eval()
        self.processor = processor
        self.config = model.config

    def saliency_block(self, visual: torch.nn.Module) -> torch.nn.Module:
        """The block whose received attention is the saliency: the last (all attend globally)."""
        return visual.blocks[-1]

    def raster_order(self, visual: torch.nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merge groups in the tower's row order -> raster order (Qwen2-VL: already raster)."""
        return torch.arange(int(grid_thw.prod(-1).sum()) // visual.spatial_merge_size**2)

    @torch.inference_mode()
    def tower_outputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[TowerOutput]:
        """Per image: merger inputs (zero row first: no CLS) and pooled received attention."""
        return self.run_tower(pixel_values, grid_thw)[0]

    def run_tower(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[list[TowerOutput], object]:
        """`tower_outputs` and the tower's own output."""
        apply_rotary_pos_emb_vision = importlib.import_module(self.modeling).apply_rotary_pos_emb_vision

        visual = self.model.model.visual
        block = self.saliency_block(visual)
        captured: dict[str, object] = {}
        hooks = [
            block.register_forward_pre_hook(
                lambda module, args, kwargs: captured.update(block=(args[0], kwargs)), with_kwargs=True
            ),
            visual.merger.register_forward_pre_hook(lambda module, args: captured.update(merger=args[0])),
        ]
        try:
            output = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
        finally:
            for hook in hooks:
                hook.remove()

        block_input, kwargs = captured["block"]
        attention = block.attn
        length = block_input.shape[0]
        query, key, _ = (
            attention.qkv(block.norm1(block_input)).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )
        query, key = apply_rotary_pos_emb_vision(query, key, *kwargs["position_embeddings"])
        received = received_attention(query, key, kwargs["cu_seqlens"].tolist(), attention.scaling)
        unit = visual.spatial_merge_size**2
        sizes = (grid_thw.prod(-1) // unit).tolist()
        per_image = received.split([size * unit for size in sizes])
        towers = merged_tower_outputs(per_image, captured["merger"], self.raster_order(visual, grid_thw), unit, sizes)
        return towers, output

    def prefill_inputs(self, tower_output: object, kept: torch.Tensor, is_image: torch.Tensor) -> dict:
        """Extra language-model inputs for the pruned prompt's prefill, given the tower's
        output, the kept merged tokens [K] (indices into all images' merged tokens, in
        prompt order) and the pruned prompt's image-token mask [L] (none here)."""
        return {}

    @torch.inference_mode()
    def split_inputs(self, image: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What PromPrune's split and adaptive budgets see for one image: the merged tokens
        before [N, Dm] and after the merger's projection [N, D], and their received attention [N]."""
        inputs = self.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
        (tower,) = self.tower_outputs(inputs["pixel_values"], inputs["image_grid_thw"])
        patches = tower.hidden[0, 1:]
        return patches, merger_projection(self.model.model.visual.merger)(patches), tower.saliency[0]

    @torch.inference_mode()
    def greedy(
        self,
        prompt: str,
        images: Sequence[object],
        settings: Mapping[str, object] | None = None,
        max_new_tokens: int = 8,
    ) -> tuple[list[int], list[int], torch.Tensor]:
        """Greedy decode with pruned images; no early stop at EOS.

        Args:
            prompt: text with one `<|image_pad|>` per image (in its vision markers).

        Returns:
            (pruned prompt ids, generated token ids, prompt positions [3, L]).
        """
        inputs = self.processor(text=[prompt], images=list(images), return_tensors="pt")
        ids = inputs["input_ids"][0]
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        positions = positions[:, 0]
        grid_thw = inputs["image_grid_thw"]
        towers, tower_output = self.run_tower(inputs["pixel_values"], grid_thw)
        image_settings = parse_image_settings(settings, len(images), option_defaults=QWEN_OPTION_DEFAULTS)
        image_token = self.config.image_token_id
        is_image = ids == image_token
        starts = [i for i in range(len(ids)) if is_image[i] and (i == 0 or not is_image[i - 1])]

        columns, rows, kept, cursor, first_token = [], [], [], 0, 0
        # Images of equal size select as one batch (the result is each image's own).
        instructions = instruction_embeddings(self.model, self.processor, ids.tolist(), image_settings)
        pruned_images = prune_towers_indexed(
            towers, image_settings, merger_projection(self.model.model.visual.merger), instructions=instructions
        )
        for start, tower, pruned in zip(starts, towers, pruned_images, strict=True):
            columns += [torch.arange(cursor, start), start + pruned.kept]  # kept tokens in row order
            rows.append(pruned.rows)
            kept.append(first_token + pruned.kept)
            cursor = start + tower.hidden.shape[1] - 1
            first_token += tower.hidden.shape[1] - 1
        columns.append(torch.arange(cursor, len(ids)))
        kept_columns = torch.cat(columns)
        pruned_ids, pruned_positions = ids[kept_columns], positions[:, kept_columns]

        embeds = self.model.get_input_embeddings()(pruned_ids[None])
        embeds[0, pruned_ids == image_token] = torch.cat(rows).to(embeds.dtype)
        prefill = self.prefill_inputs(tower_output, torch.cat(kept), pruned_ids == image_token)
        generated = greedy_decode(self.model, embeds, max_new_tokens, pruned_positions, **prefill)
        return pruned_ids.tolist(), generated, pruned_positions


class PrunedQwen2_5_VLReference(PrunedQwen2VLReference):
    """`PrunedQwen2VLReference` for Qwen2.5-VL: saliency at the last full-attention block,
    window order undone with transformers' own window index."""

    modeling = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"

    def saliency_block(self, visual: torch.nn.Module) -> torch.nn.Module:
        return visual.blocks[max(visual.fullatt_block_indexes)]

    def raster_order(self, visual: torch.nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return torch.argsort(window_index)


class PrunedQwen3VLReference(PrunedQwen2VLReference):
    """`PrunedQwen2VLReference` for Qwen3-VL (dense or MoE): saliency at the last block
    (all attend globally), and the kept tokens' rows of every deepstack level go to the
    first LLM layers as transformers' `deepstack_visual_embeds`."""

    modeling = "transformers.models.qwen3_vl.modeling_qwen3_vl"

    def prefill_inputs(self, tower_output: object, kept: torch.Tensor, is_image: torch.Tensor) -> dict:
        return {
            "visual_pos_masks": is_image[None],
            "deepstack_visual_embeds": [level[kept] for level in tower_output.deepstack_features],
        }


REFERENCE_CLASSES: Mapping[str, type] = {
    "LlavaForConditionalGeneration": PrunedLlavaReference,
    "LlavaNextForConditionalGeneration": PrunedLlavaNextReference,
    "Qwen2_5_VLForConditionalGeneration": PrunedQwen2_5_VLReference,
    "Qwen2VLForConditionalGeneration": PrunedQwen2VLReference,
    "Qwen3VLForConditionalGeneration": PrunedQwen3VLReference,
    "Qwen3VLMoeForConditionalGeneration": PrunedQwen3VLReference,
}
"""The reference class of each supported transformers architecture."""


def load_reference(model: str | Path) -> PrunedLlavaReference | PrunedQwen2VLReference:
    """The reference for a checkpoint (directory or hub id): its transformers model with
    eager attention (the references read attention weights) and its processor."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    architecture = (config.architectures or ["?"])[0]
    if architecture not in REFERENCE_CLASSES:
        raise ValueError(f"{model}: architecture {architecture} has no reference; supported: {sorted(REFERENCE_CLASSES)}")
    hf_model = getattr(transformers, architecture).from_pretrained(model, attn_implementation="eager")
    return REFERENCE_CLASSES[architecture](hf_model, transformers.AutoProcessor.from_pretrained(model))
