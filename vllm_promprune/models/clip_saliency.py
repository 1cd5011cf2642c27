"""Run vLLM's (truncated) CLIP tower and recompute the CLS attention row.

vLLM builds a LLaVA CLIP tower only up to the selected feature layer, so the
last built encoder layer is the one whose OUTPUT is the feature layer. Its
CLS-query attention (softmax over all N+1 keys) is recomputed from that
layer's input: layer_norm1 -> fused qkv projection -> one query per head.
"""

from __future__ import annotations

import torch

from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.clip import CLIPVisionModel


def clip_features_and_cls_attention(
    tower: CLIPVisionModel, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected-layer patch features and head-mean CLS attention.

    Args:
        tower: vLLM CLIP tower built by `init_vision_tower_for_llava`
            (no post-layernorm: LLaVA selects a hidden layer).
        pixel_values: [B, 3, H, W].

    Returns:
        features [B, N, Dv] (CLS dropped, identical to the tower's own output for
        feature_select_strategy="default") and cls_attention [B, N] float32 (head mean,
        CLS column dropped, not renormalised).
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
    head_sum = logits.softmax(dim=-1).sum(dim=1)  # [B, N+1]
    if heads != attention.num_heads:  # heads sharded over tensor-parallel ranks
        head_sum = tensor_model_parallel_all_reduce(head_sum)
    cls_attention = head_sum[:, 1:] / attention.num_heads
    features = last(hidden)[:, 1:]
    return features, cls_attention
