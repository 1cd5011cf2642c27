"""Shared checks and helpers for the pure selection methods (no vLLM import)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError

Order = Literal["spatial", "selection"]
ORDERS: tuple[str, ...] = ("spatial", "selection")

# Norm clamps (the eps of F.normalize), as each reference sets them (methods.md).
COSINE_EPS = 1e-6
"""Token-to-token cosine: DivPrune, FPS, facility location, VisPruner, the DPP kernel, VisionZip's keys."""
FINE_EPS = 1e-8
"""PromPrune's spectrum and cosine matrix, PruneSID's PCA and NMS rows."""


def check_keep(keep: object, num_tokens: int | None = None, *, name: str = "keep") -> int:
    """The one budget check of the methods; returns `keep` as an int.

    Without `num_tokens` (a caller's budget K): an integer >= 1. With it (a step
    count inside a method, where 0 is an empty selection): an integer in
    [0, num_tokens]. Raises ValueError naming `name` otherwise.
    """
    is_int = isinstance(keep, int) and not isinstance(keep, bool)
    if num_tokens is not None:
        if not is_int or not 0 <= keep <= num_tokens:
            raise ValueError(f"{name} must be an integer in [0, N={num_tokens}], got {keep!r}")
        return keep
    if not is_int:
        raise ValueError(
            f"{name} must be an integer >= 1 (number of visual tokens to keep), "
            f"got {keep!r} of type {type(keep).__name__}"
        )
    if keep < 1:
        raise ValueError(f"{name} must be an integer >= 1 (number of visual tokens to keep), got {keep}")
    return keep


def check_batch(features: torch.Tensor, k: int, selected: torch.Tensor | None = None) -> None:
    """Raise ValueError unless features is [B, N, D], 0 <= k <= N and selected is [B, N] bool."""
    if features.dim() != 3:
        raise ValueError(f"features must have shape [B, N, D], got {tuple(features.shape)}")
    check_keep(k, features.shape[1], name="k")
    if selected is not None and (selected.dtype != torch.bool or selected.shape != features.shape[:2]):
        raise ValueError(
            f"selected must be a bool tensor of shape {tuple(features.shape[:2])}, "
            f"got {selected.dtype} {tuple(selected.shape)}"
        )


def check_order(order: object) -> Order:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
    return order  # type: ignore[return-value]


def row_norms(features: torch.Tensor) -> torch.Tensor:
    """float32 L2 norm of each row of `features` [..., N, D] -> [..., N]."""
    return features.float().norm(dim=-1)


def unit_rows(features: torch.Tensor, eps: float, norms: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalise each row of `features` [..., N, D] in float32 (norm clamped at `eps`),
    bit for bit as `F.normalize`. `norms` [..., N] (`row_norms`), when a caller has
    them already, saves that pass over the features."""
    if norms is None:
        return F.normalize(features.float(), dim=-1, eps=eps)
    return features.float() / norms.clamp_min(eps)[..., None]


# Row-block height of `gram_matrix` on CPU: blocks of at most this many rows
# keep each product's operands in cache (measured fastest from 288 to 512 rows
# at D = 3584-4096 on the 2-core CPU).
_GRAM_BLOCK_ROWS = 512


def gram_matrix(rows: torch.Tensor) -> torch.Tensor:
    """rows @ rows^T [..., N, N] for rows [..., N, D], exactly symmetric.

    On CPU only the upper triangle of row blocks is multiplied and mirrored:
    about half the FLOPs of one product, and 1.2-1.9x faster on the project's
    CPU for N = 576-2880. Elsewhere (CUDA) one batched product is faster.
    """
    num_rows = rows.shape[-2]
    blocks = -(-num_rows // _GRAM_BLOCK_ROWS)
    if rows.device.type != "cpu" or blocks < 2:
        return rows @ rows.transpose(-1, -2)
    edges = [round(i * num_rows / blocks) for i in range(blocks + 1)]
    spans = [slice(edges[i], edges[i + 1]) for i in range(blocks)]
    gram = rows.new_empty(*rows.shape[:-1], num_rows)
    for i, row_span in enumerate(spans):
        for col_span in spans[i:]:
            block = rows[..., row_span, :] @ rows[..., col_span, :].transpose(-1, -2)
            gram[..., row_span, col_span] = block
            if col_span is not row_span:
                gram[..., col_span, row_span] = block.transpose(-1, -2)
    return gram


def cosine_matrix(features: torch.Tensor, eps: float, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity [B, N, N] of the rows of `features` [B, N, D] (float32, norms
    clamped at `eps`; `norms` as in `unit_rows`)."""
    return gram_matrix(unit_rows(features, eps, norms))


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` [B, K] of `values` [B, N, D] -> [B, K, D]."""
    return values.gather(1, index[:, :, None].expand(-1, -1, values.shape[2]))


def finish_order(picked: torch.Tensor, order: Order) -> torch.Tensor:
    """Return picked indices [K] (int64) in the requested order."""
    if order == "spatial":
        return torch.sort(picked).values
    return picked


def describe_validation_error(error: ValidationError, field_prefix: str, model: type[BaseModel]) -> str:
    """One line per problem, each naming the field as `{field_prefix}{name}` and what it accepts."""
    fields = model.model_fields
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"{field_prefix}{name}: unknown option (allowed: {', '.join(fields) or 'none'})")
        elif name:
            field = fields.get(str(item["loc"][0]))
            accepts = f" [{item['loc'][0]}: {field.description}]" if field is not None and field.description else ""
            problems.append(f"{field_prefix}{name}: {item['msg']} (got {item['input']!r}){accepts}")
        else:
            problems.append(f"{field_prefix.rstrip('.') or 'options'}: {item['msg']}")
    return "; ".join(problems)
