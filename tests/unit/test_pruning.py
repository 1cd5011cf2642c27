"""The pipeline glue: a batch of images gives each image its own result."""

from __future__ import annotations

import torch

from vllm_promprune.pruning import PrunedImage, TowerOutput, prune_images_indexed
from vllm_promprune.settings import PruneSettings


def _tower(num_tokens: int, seed: int, dtype: torch.dtype, width: int = 24) -> TowerOutput:
    """One image: clustered hidden states [1, N + 1, Dv] in `dtype`, float32 saliency and keys."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, width, generator=g)
    hidden = centres[torch.randint(5, (num_tokens + 1,), generator=g)] + 0.3 * torch.randn(num_tokens + 1, width, generator=g)
    saliency = torch.randn(num_tokens, generator=g).softmax(dim=0)
    keys = hidden[:, :8] + torch.randn(num_tokens + 1, 8, generator=g)
    return TowerOutput(hidden[None].to(dtype), saliency[None], keys[None])


def _projector(dtype: torch.dtype, width: int = 24) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.LayerNorm(width), torch.nn.Linear(width, 40), torch.nn.GELU(), torch.nn.Linear(40, 40)]
    return torch.nn.Sequential(*layers).to(dtype).eval()


def _same(a: PrunedImage, b: PrunedImage) -> bool:
    kept_same = (a.kept is None and b.kept is None) or (
        a.kept is not None and b.kept is not None and torch.equal(a.kept, b.kept)
    )
    return kept_same and torch.equal(a.rows, b.rows)


def test_cls_row_of_an_image_does_not_depend_on_its_batch() -> None:
    # Projecting the CLS rows of 2 images as one [2, 1, Dv] product rounds them differently
    # from [1, 1, Dv] (seen on this CPU for these seeds): each is projected on its own.
    towers = [_tower(100, seed, torch.float32) for seed in (3, 6)]
    settings = [PruneSettings(keep=10, method="prunesid")] * 2
    project = _projector(torch.float32)
    with torch.inference_mode():
        together = prune_images_indexed(TowerOutput.cat(towers), settings, project)
        alone = [prune_images_indexed(t, settings[:1], project)[0] for t in towers]
    assert all(_same(a, b) for a, b in zip(together, alone))
