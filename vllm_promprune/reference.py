"""Plain-transformers reference: LLaVA with the same token selection, no vLLM.

Two uses: the tests check that vLLM's pruned output equals this forward, and
researchers can apply the selection methods to HF LLaVA models directly.
Saliency here comes from transformers' own attention probabilities
(`output_attentions=True`, eager attention), not from the recomputation the
vLLM path uses, so agreement checks that recomputation too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .pruning import TowerOutput, prune_images
from .settings import PruneSettings, parse_settings


class PrunedLlavaReference:
    """Wraps an HF `LlavaForConditionalGeneration` loaded with attn_implementation="eager"."""

    def __init__(self, model, processor) -> None:  # noqa: ANN001 (transformers types)
        if model.config.vision_feature_select_strategy != "default":
            raise ValueError("the reference supports vision_feature_select_strategy='default'")
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
    def pruned_embeddings(self, images: Sequence[object], settings: Sequence[PruneSettings]) -> list[torch.Tensor]:
        """The LLM's image embeddings, one [K_i, D] tensor per image."""
        tower = self.tower_output(self.pixel_values(images))
        return prune_images(tower, settings, self.model.model.multi_modal_projector)

    @torch.inference_mode()
    def greedy(
        self,
        prompt_ids: Sequence[int],
        images: Sequence[object],
        settings: PruneSettings | Mapping[str, object] | None = None,
        max_new_tokens: int = 8,
    ) -> tuple[list[int], list[int]]:
        """Greedy decode with pruned images; no early stop at EOS.

        Args:
            prompt_ids: token ids with ONE image token per image (unexpanded).
            images: PIL images, in prompt order.
            settings: pruning settings (None: keep all).

        Returns:
            (expanded prompt ids, generated token ids).
        """
        if not isinstance(settings, PruneSettings):
            settings = parse_settings(settings)
        image_token = self.config.image_token_index
        kept = self.pruned_embeddings(images, [settings] * len(images))
        if sum(1 for t in prompt_ids if t == image_token) != len(kept):
            raise ValueError("prompt must contain exactly one image token per image")

        rows_per_image = iter(rows.shape[0] for rows in kept)
        expanded: list[int] = []
        for token in prompt_ids:
            expanded.extend([token] * (next(rows_per_image) if token == image_token else 1))
        ids = torch.tensor([expanded])
        embeds = self.model.get_input_embeddings()(ids)
        embeds[0, ids[0] == image_token] = torch.cat(kept).to(embeds.dtype)

        language_model = self.model.model.language_model
        out = language_model(inputs_embeds=embeds, use_cache=True)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            next_token = self.model.lm_head(out.last_hidden_state[:, -1]).argmax(dim=-1)
            generated.append(int(next_token))
            out = language_model(
                input_ids=next_token[:, None], past_key_values=out.past_key_values, use_cache=True
            )
        return expanded, generated
