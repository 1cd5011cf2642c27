"""Qwen-VL pieces shared by the vLLM models and the transformers references (no vLLM import).

Saliency. The Qwen-VL towers have no CLS token, so a merged token's saliency is
the attention its patches RECEIVE: the softmax attention of every query patch
of the image, averaged over queries and heads, at the tower's last
full-attention block. Which block that is, per family:
- Qwen2.5-VL: `max(fullatt_block_indexes)` (block 31 of 32 in Qwen2.5-VL-7B). Its
  other blocks attend within 112 x 112 px windows, whose scores from different
  windows would not be comparable. The tower runs in window order; scores are
  mapped back to the raster order of the merged tokens.
- Qwen2-VL and Qwen3-VL: the last block (`depth - 1`); every block attends over
  the whole image, and patches arrive in merge-group order.
Scores are averaged over each 2 x 2 merge group (4 consecutive patches). They
cost O(L^2) per image of L patches and are computed only for images whose
selection reads them (`PruneSettings.reads_saliency`).

Positions. A kept token keeps its true M-RoPE position: (t, h, w) of its merged
grid cell offset by the image's start. vLLM fixes a request's positions when the
request arrives, before the tower has chosen the tokens, so the model lays out
each pruned image's K slots at the image start and every token after the image
exactly where the unpruned model puts it (`mrope_positions`), and each kept
token's embedding carries its (t, h, w) grid offset in `OFFSET_COLUMNS` extra
columns that are added to the positions in the forward pass that consumes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..methods.promprune import QWEN2_5_VL_MU
from ..pruning import TowerOutput

QWEN_OPTION_DEFAULTS = {"mu": QWEN2_5_VL_MU}
"""Method-option defaults for Qwen2.5-VL (PromPrune's entropy threshold for its tower, methods.md)."""

QWEN_TOWER_INPUTS = frozenset({"features", "saliency", "pre_features", "instruction"})
"""The `TokenBatch` inputs Qwen's tower provides (no CLS token, no saliency-layer keys), and the
instruction embeddings the language model gives."""
QWEN_TOWER_NAME = "the Qwen-VL vision tower (no CLS token, no saliency-layer keys)"

OFFSET_COLUMNS = 6
"""Extra embedding columns: (t, h, w) offsets, each as (value // 256, value % 256)."""
_BASE = 256  # integers below 256 are exact in bfloat16


class Media(NamedTuple):
    """One image or video in a prompt."""

    offset: int  # index of its first placeholder
    length: int  # placeholders (K when pruned)
    grid: tuple[int, int, int]  # merged grid (t, h, w)
    t_factor: float = 1.0  # temporal position step per frame group (videos)

    def grid_positions(self) -> torch.Tensor:
        """[3, t*h*w] (t, h, w) offsets of every grid cell in raster order, as stock."""
        t, h, w = self.grid
        cells = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        cells = cells.reshape(3, -1)
        cells[0] = (cells[0] * self.t_factor).long()
        return cells


def mrope_positions(num_tokens: int, media: Sequence[Media]) -> tuple[torch.Tensor, int]:
    """M-RoPE positions [3, num_tokens] of a prompt and the delta for generated tokens.

    Text advances by one; an unpruned item's tokens get their grid positions;
    a pruned item's K slots all get its start position (offsets are added by the
    model later). Either way the next token starts one past the largest
    position of the item's FULL grid, as in the unpruned model.
    """
    parts = []
    cursor, next_position = 0, 0
    for item in sorted(media, key=lambda m: m.offset):
        text = item.offset - cursor
        parts.append(torch.arange(text).expand(3, -1) + next_position)
        start = next_position + text
        cells = item.grid_positions()
        if item.length == cells.shape[1]:
            parts.append(cells + start)
        else:
            parts.append(torch.full((3, item.length), start))
        next_position = start + int(cells.max()) + 1
        cursor = item.offset + item.length
    parts.append(torch.arange(num_tokens - cursor).expand(3, -1) + next_position)
    next_position += num_tokens - cursor
    return torch.cat(parts, dim=1), next_position - num_tokens


def grid_offsets(kept: torch.Tensor, grid_width: int) -> torch.Tensor:
    """[K, 3] (t, h, w) offsets of kept merged tokens given their raster index (images: t = 0)."""
    return torch.stack([torch.zeros_like(kept), kept // grid_width, kept % grid_width], dim=1)


def encode_offsets(offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[K, 3] integer offsets -> [K, OFFSET_COLUMNS] columns exact in `dtype` (bf16 included)."""
    return torch.cat([offsets // _BASE, offsets % _BASE], dim=1).to(dtype)


def decode_offsets(columns: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_offsets`: [K, OFFSET_COLUMNS] -> [K, 3] long."""
    high, low = columns.round().long().split(3, dim=1)
    return high * _BASE + low


def frame_bounds(grid_thw: Sequence[Sequence[int]]) -> list[int]:
    """Boundaries [0, ..., L] of the tower's full-attention sequences: one per frame
    (t of them per item, h * w patches each), for items of patch grid (t, h, w).

    Derived from the grid rather than read from vLLM's encoder metadata, whose
    `cu_seqlens` some attention backends rescale (FlashInfer: by the head width).
    """
    bounds = [0]
    for t, h, w in grid_thw:
        for _ in range(int(t)):
            bounds.append(bounds[-1] + int(h) * int(w))
    return bounds


def received_attention(
    query: torch.Tensor, key: torch.Tensor, cu_seqlens: Sequence[int], scale: float, chunk_elements: int = 2**26
) -> torch.Tensor:
    """Attention each patch receives, averaged over query patches and heads.

    Args:
        query, key: [L, H, d] (rotary embedding applied), patches of several
            sequences packed along L.
        cu_seqlens: sequence boundaries [0, ..., L] (`frame_bounds`: one sequence per image).
        scale: softmax scale (d ** -0.5).
        chunk_elements: off CPU, bound on the attention-probability block held at once
            (`chunked_column_sums`; on CPU `fused_column_sums` holds one kernel tile).

    Returns:
        [L] float32.
    """
    received = torch.empty(query.shape[0], dtype=torch.float32, device=query.device)
    heads = query.shape[1]
    for start, stop in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        q, k = query[start:stop].float().transpose(0, 1), key[start:stop].float().transpose(0, 1)
        if query.device.type == "cpu":
            sums = fused_column_sums(q, k, scale)
        else:
            sums = chunked_column_sums(q, k, scale, chunk_elements)
        received[start:stop] = sums / (heads * (stop - start))
    return received


def fused_column_sums(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Column sums of the softmax attention, summed over heads, by two passes of torch's fused
    CPU attention kernel, which never holds more than a tile of probabilities.

    Pass 1: lse_q = log sum_k exp(s_qk), s = scale q.k. Pass 2 runs the same kernel with
    keys as queries and queries as keys, the logits extended by one dimension to
    s_qk - lse_q, so its log-sum-exp per key is log sum_q softmax_q(k). Exact up to float
    rounding. Only the kernel's log-sum-exp output is used; its zero values still cost a
    product as large as the logits'.

    Args:
        query, key: [H, L, d] float32 (CPU).

    Returns:
        [L] float32: sum over heads and queries of each key's attention probability.
    """
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    query, key = query[None], key[None]
    _, query_lse = attention(query, key, torch.zeros_like(query), scale=scale)  # [1, H, L]
    extended_key = torch.cat([key * scale, torch.ones_like(key[..., :1])], dim=-1)
    extended_query = torch.cat([query, -query_lse[..., None]], dim=-1)
    _, key_lse = attention(extended_key, extended_query, torch.zeros_like(extended_key), scale=1.0)
    return key_lse[0].exp().sum(dim=0)


def chunked_column_sums(query: torch.Tensor, key: torch.Tensor, scale: float, chunk_elements: int) -> torch.Tensor:
    """`fused_column_sums` on any device: softmax over chunks of whole query rows (at most
    `chunk_elements` probabilities at once), summed over heads and queries.

    Args:
        query, key: [H, L, d] float32.

    Returns:
        [L] float32.
    """
    heads, length, _ = query.shape
    rows = max(1, chunk_elements // (length * heads))
    total = torch.zeros(length, dtype=torch.float32, device=query.device)
    for row in range(0, length, rows):
        logits = torch.matmul(query[:, row : row + rows], key.transpose(1, 2)) * scale
        total += logits.softmax(dim=-1).sum(dim=(0, 1))
    return total


def to_merged_raster(window_ordered: torch.Tensor, reverse_indices: torch.Tensor, unit: int) -> torch.Tensor:
    """[L, ...] patch rows in window order -> [L / unit, unit, ...] merge groups in raster order."""
    groups = window_ordered.reshape(window_ordered.shape[0] // unit, unit, *window_ordered.shape[1:])
    return groups[reverse_indices]


def merged_tower_outputs(
    received: Sequence[torch.Tensor | None],
    merger_input: torch.Tensor,
    reverse_indices: torch.Tensor,
    unit: int,
    sizes: Sequence[int],
    merged: torch.Tensor | None = None,
) -> list[TowerOutput]:
    """Per image, the pruning inputs of its merged tokens (raster order).

    Args:
        received: per image, [unit * N] attention its patches receive (`received_attention`),
            window order; None where no selection reads it (not computed).
        merger_input: [L, Dv] the patch merger's input, window order.
        reverse_indices: [L / unit] window order -> raster order of the merge groups (the
            window order permutes each image's groups among themselves).
        unit: patches per merge group (4). sizes: merged tokens per image.
        merged: [sum N, D] the merger's output for `merger_input`, raster order (the stock
            embeddings), or None (projected when pruning).

    Returns:
        `hidden` [1, N + 1, unit * Dv]: a zero row (there is no CLS token) then
        each merge group's concatenated patches; `saliency` [1, N]: the received
        attention averaged over the group, or None; no keys; `features` [1, N, D]
        from `merged`, or None.
    """
    pre_features = to_merged_raster(merger_input, reverse_indices, unit).flatten(1)
    outputs, first = [], 0
    for size, image_received in zip(sizes, received, strict=True):
        pre = pre_features[first : first + size]
        saliency = None
        if image_received is not None:
            image_order = reverse_indices[first : first + size] - first
            saliency = to_merged_raster(image_received, image_order, unit).mean(dim=1)[None]
        features = None if merged is None else merged[first : first + size][None]
        hidden = torch.cat([torch.zeros_like(pre[:1]), pre])[None]
        outputs.append(TowerOutput(hidden=hidden, saliency=saliency, keys=None, features=features))
        first += size
    return outputs


def raster_tower_outputs(
    received: Sequence[torch.Tensor | None],
    merger_input: torch.Tensor,
    unit: int,
    sizes: Sequence[int],
    merged: torch.Tensor | None = None,
) -> list[TowerOutput]:
    """`merged_tower_outputs` of a tower whose patches arrive in raster order of their
    merge groups (Qwen2-VL, Qwen3-VL); `merger_input` [L, ..., Dv]."""
    raster = torch.arange(sum(sizes), device=merger_input.device)
    rows = merger_input.reshape(-1, merger_input.shape[-1])
    return merged_tower_outputs(received, rows, raster, unit, sizes, merged)


def merger_projection(merger: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """[..., unit * Dv] merge groups -> [..., D] LLM embeddings through the tower's own
    patch merger (vLLM's or transformers': all take [rows, Dv] and merge `unit` rows;
    Qwen2/2.5-VL name its norm `ln_q`, Qwen3-VL `norm`)."""
    norm = merger.ln_q if hasattr(merger, "ln_q") else merger.norm
    width = norm.weight.shape[0]

    def project(groups: torch.Tensor) -> torch.Tensor:
        return merger(groups.reshape(-1, width)).view(*groups.shape[:-1], -1)

    return project
