"""Run vLLM's (truncated) CLIP tower and recompute the CLS attention row.

vLLM builds a LLaVA CLIP tower only up to the selected feature layer, so the
last built encoder layer is the one whose OUTPUT is the feature layer. Its
CLS-query attention (softmax over all N+1 keys) is recomputed from that
layer's input: layer_norm1 -> fused qkv projection -> one query per head.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.clip import CLIPVisionModel

from ...pruning import TowerOutput

CLIP_LLAVA_FAMILIES = {"LlavaForConditionalGeneration": "LLaVA", "LlavaNextForConditionalGeneration": "LLaVA-NeXT"}
"""Stock architectures whose pruned variant reads saliency from a CLIP tower, and their family names."""


def check_clip_llava_config(config: Any, family: str) -> None:
    """Refuse a LLaVA-like checkpoint this module cannot read saliency from (at model init,
    and in `vllm-promprune serve` before vLLM starts).

    Raises ValueError naming every unsupported setting: a vision tower other than
    CLIP (SigLIP and Pixtral have no CLS token), `vision_feature_select_strategy`
    other than "default" (with "full" the CLS row would be an LLM token), or a
    list of feature layers (no single layer to read attention from).
    """
    problems = []
    vision_type = getattr(config.vision_config, "model_type", type(config.vision_config).__name__)
    if vision_type != "clip_vision_model":
        problems.append(
            f"vision tower {vision_type!r}: only CLIP towers are supported (saliency is the CLS "
            "token's attention; SigLIP and Pixtral towers have no CLS token)"
        )
    strategy = config.vision_feature_select_strategy
    if strategy != "default":
        problems.append(f"vision_feature_select_strategy {strategy!r}: only 'default' is supported")
    layer = config.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        problems.append(f"vision_feature_layer {layer!r}: only a single integer layer is supported")
    if problems:
        raise ValueError(f"vllm-promprune cannot prune this {family} checkpoint: " + "; ".join(problems))


def clip_tower_output(tower: CLIPVisionModel, pixel_values: torch.Tensor) -> TowerOutput:
    """Selected-layer hidden states (CLS first), head-mean CLS attention and keys.

    Args:
        tower: vLLM CLIP tower built by `init_vision_tower_for_llava`
            (no post-layernorm: LLaVA selects a hidden layer).
        pixel_values: [B, 3, H, W].

    The patch rows of `hidden` are identical to the tower's own output for
    feature_select_strategy="default" (same modules, same order of operations).
    """
    vision = tower.vision_model
    if vision.post_layernorm is not None:
        raise ValueError("CLS saliency expects a tower without post_layernorm")
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    *earlier, last = vision.encoder.layers
    for layer in earlier:
        hidden = layer(hidden)
    attention = last.self_attn
    qkv, _ = attention.qkv_proj(last.layer_norm1(hidden))
    query, key, _ = qkv.chunk(3, dim=-1)
    batch, length, _ = key.shape
    heads, head_dim = attention.num_heads_per_partition, attention.head_dim
    cls_query = query[:, 0].float().view(batch, heads, head_dim)
    keys = key.float().view(batch, length, heads, head_dim)
    logits = torch.einsum("bhd,blhd->bhl", cls_query, keys) * attention.scale
    head_sums = torch.cat([logits.softmax(dim=-1).sum(dim=1), keys.sum(dim=2).flatten(1)], dim=1)
    if heads != attention.num_heads:  # heads sharded over tensor-parallel ranks
        head_sums = tensor_model_parallel_all_reduce(head_sums)
    head_sums = head_sums / attention.num_heads
    saliency = head_sums[:, 1:length]  # CLS column dropped, not renormalised
    mean_keys = head_sums[:, length:].view(batch, length, head_dim)
    return TowerOutput(hidden=last(hidden), saliency=saliency, keys=mean_keys)
