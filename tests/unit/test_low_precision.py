"""bf16 / fp16 tower outputs select exactly as float32 inputs holding the same rounded values.

methods.md: all score math runs in float32, whatever the model dtype. So a method given
low-precision inputs must return what it returns for those values converted to float32
(the conversion is exact). Merged rows (VisionZip) are computed in float32 from the same
rounded inputs and returned in the tower's dtype.
"""

from __future__ import annotations

import pytest
import torch

from vllm_promprune.methods import METHODS, TokenBatch, reduce_tokens
from vllm_promprune.pruning import (
    CLS_TOWER_INPUTS,
    PrunedImage,
    TowerOutput,
    prune_images_indexed,
    prune_towers_indexed,
)
from vllm_promprune.settings import PruneSettings

LOW = [torch.bfloat16, torch.float16]

# Options that reach every code path with float math: each entropy proxy and coverage stage.
OPTIONS: dict[str, list[dict[str, object]]] = {
    "promprune": [
        {},
        {"mu": 0.9},
        {"mu": 0.6, "tau": 0.2, "coverage": "fps"},
        {"entropy": "attention", "coverage": "fl"},
        {"entropy": "feature_norm", "mu": 0.8},
    ],
    "prunesid": [{}, {"pca": "lowrank"}],
    "vispruner": [{}, {"important_ratio": 0.25}],
    "cdpruner": [{}, {"relevance_sign": -1, "theta": 0.3}],
}


def _rounded(images: int, num_tokens: int, dtype: torch.dtype, seed: int) -> TokenBatch:
    """Clustered inputs with every tensor rounded to `dtype` (coarse saliency: many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(images, 5, 40, generator=g)
    pre = centres[torch.arange(images)[:, None], torch.randint(5, (images, num_tokens + 1), generator=g)]
    pre = pre + 0.3 * torch.randn(images, num_tokens + 1, 40, generator=g)
    features = pre[:, 1:] @ torch.randn(40, 56, generator=g)
    saliency = torch.randn(images, num_tokens, generator=g).softmax(dim=-1)
    keys = pre[:, :, :16] + torch.randn(images, num_tokens + 1, 16, generator=g)
    instruction = torch.randn(images, 6, 56, generator=g)
    return TokenBatch(*(t.to(dtype) for t in (features, saliency, pre[:, 1:], pre[:, 0], keys, instruction)))


def _as_float(batch: TokenBatch) -> TokenBatch:
    return TokenBatch(*(t.float() for t in batch))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_matches_float32_on_the_rounded_values(method: str, dtype: torch.dtype) -> None:
    spec = METHODS[method]
    for options in OPTIONS.get(method, [{}]):
        for seed, keep in ((0, 9), (1, 30)):
            low = _rounded(3, 80, dtype, seed)
            parsed = spec.options(**options)
            result = reduce_tokens(method, low, keep, parsed)
            reference = reduce_tokens(method, _as_float(low), keep, parsed)
            if spec.merges:  # rows built in float32, returned in the tower's dtype
                assert result.dtype == dtype
                assert torch.equal(result, reference.to(dtype)), f"{method} {options} K={keep}"
            else:
                assert torch.equal(result, reference), f"{method} {options} K={keep}"


# --------------------------------------------------------------------------- the pipeline


def _projector(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.LayerNorm(40), torch.nn.Linear(40, 48), torch.nn.GELU(), torch.nn.Linear(48, 48)]
    return torch.nn.Sequential(*layers).to(dtype).eval()


def _towers(dtype: torch.dtype, low_saliency: bool) -> list[TowerOutput]:
    """Two towers of different N: hidden and keys in `dtype`; saliency float32 (as the CLIP and
    Qwen towers compute it) or rounded to `dtype` too."""
    towers = []
    for seed, (images, num_tokens) in enumerate([(2, 64), (1, 90)]):
        batch = _rounded(images, num_tokens, dtype, seed)
        hidden = torch.cat([batch.cls_pre_feature[:, None], batch.pre_features], dim=1)
        saliency = batch.saliency if low_saliency else batch.saliency.float()
        towers.append(TowerOutput(hidden, saliency, batch.keys))
    return towers


SETTINGS = [
    PruneSettings(keep=10, method=method, options=options)
    for method in sorted(METHODS)
    if set(METHODS[method].needs) <= CLS_TOWER_INPUTS  # the pipeline's inputs
    for options in OPTIONS.get(method, [{}])[:2]
]


def _same(low: PrunedImage, high: PrunedImage) -> bool:
    kept = (low.kept is None and high.kept is None) or torch.equal(low.kept, high.kept)
    return kept and torch.equal(low.rows.float(), high.rows)


@pytest.mark.parametrize("low_saliency", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_pipeline_matches_float32_on_the_rounded_values(dtype: torch.dtype, low_saliency: bool) -> None:
    """`prune_towers_indexed` / `prune_images_indexed` with a projector in `dtype`, against the
    float32 towers and a projector giving the same (rounded) embeddings in float32."""
    projector = _projector(dtype)

    def project_float(rows: torch.Tensor) -> torch.Tensor:
        return projector(rows.to(dtype)).float()

    towers = _towers(dtype, low_saliency)
    towers_float = [TowerOutput(t.hidden.float(), t.saliency.float(), t.keys.float()) for t in towers]
    # The engine hands selection the LLM's `dtype` instruction embeddings as float32.
    instruction = torch.randn(6, 48, generator=torch.Generator().manual_seed(7)).to(dtype).float()
    with torch.inference_mode():
        for settings in SETTINGS:
            instructions = [instruction if settings.reads_instruction else None] * 3
            low = prune_towers_indexed(towers, [settings] * 3, projector, instructions=instructions)
            high = prune_towers_indexed(towers_float, [settings] * 3, project_float, instructions=instructions)
            assert all(_same(a, b) for a, b in zip(low, high)), settings
            assert all(image.rows.dtype == dtype for image in low)
            one_low = prune_images_indexed(towers[0], [settings] * 2, projector, instructions=instructions[:2])
            one_high = prune_images_indexed(towers_float[0], [settings] * 2, project_float, instructions=instructions[:2])
            assert all(_same(a, b) for a, b in zip(one_low, one_high)), settings
