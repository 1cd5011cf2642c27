"""The pipeline glue: images of equal token count select as one batch, with the per-image result."""

from __future__ import annotations

import pytest
import torch

from vllm_promprune.methods import METHODS
from vllm_promprune.pruning import CLS_TOWER_INPUTS, PrunedImage, TowerOutput, prune_images_indexed, prune_towers_indexed
from vllm_promprune.settings import PruneSettings

SETTINGS = [
    PruneSettings(keep=12, method="promprune"),
    PruneSettings(ratio=0.25, method="divprune"),
    PruneSettings(keep=10, method="prunesid"),
    PruneSettings(keep=9, method="vispruner", order="selection"),
    PruneSettings(keep=8, method="visionzip"),
    PruneSettings(keep=11, method="promprune", options={"coverage": "fps", "mu": 0.9}),
    PruneSettings(),  # no budget: every token
]


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


def _qwen_like(tower: TowerOutput) -> TowerOutput:
    """As Qwen-VL's towers: a zero row in place of CLS, no keys."""
    return TowerOutput(torch.cat([torch.zeros_like(tower.hidden[:, :1]), tower.hidden[:, 1:]], dim=1), tower.saliency, None)


@pytest.mark.parametrize("qwen_like", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_towers_of_equal_size_select_as_one_batch_with_the_per_image_result(dtype: torch.dtype, qwen_like: bool) -> None:
    sizes = [36, 64, 36, 100, 64, 36, 100, 36, 36, 64, 36]
    setting_of = [0, 1, 0, 2, 1, 3, 2, 4, 5, 6, 4]
    towers = [_tower(n, seed, dtype) for seed, n in enumerate(sizes)]
    settings = [SETTINGS[s] for s in setting_of]
    if qwen_like:  # VisionZip needs keys: those two images use the saliency control instead
        towers = [_qwen_like(t) for t in towers]
        settings = [PruneSettings(keep=8, method="saliency") if s.method == "visionzip" else s for s in settings]
    project = _projector(dtype)
    calls: list[str] = []
    with torch.inference_mode():
        together = prune_towers_indexed(towers, settings, project, on_selection=lambda method, seconds: calls.append(method))
        alone = [prune_images_indexed(t, [s], project)[0] for t, s in zip(towers, settings)]
    for image, (a, b) in enumerate(zip(together, alone)):
        assert _same(a, b), f"image {image} ({settings[image].method}, N={sizes[image]})"
        assert a.rows.shape[0] == settings[image].kept_tokens(sizes[image])
    # One selection per (N, settings) pair of the pruned images: (36, 0) x2, (64, 1) x2,
    # (100, 2) x2, (36, 3), (36, 4) x2, (36, 5); the image without a budget selects nothing.
    merging = "saliency" if qwen_like else "visionzip"
    assert sorted(calls) == sorted(["promprune", "divprune", "prunesid", "vispruner", merging, "promprune"])


def test_towers_holding_several_images_keep_the_image_order() -> None:
    first, second, third = (_tower(n, seed, torch.float32) for seed, n in enumerate([30, 45, 30]))
    pair = TowerOutput.cat([first, third])  # a tower may hold several images of one size
    settings = [SETTINGS[0], SETTINGS[1], SETTINGS[0]]
    project = _projector(torch.float32)
    with torch.inference_mode():
        together = prune_towers_indexed([pair, second], settings, project)
        alone = [prune_images_indexed(t, [s], project)[0] for t, s in zip([first, third, second], settings)]
    assert all(_same(a, b) for a, b in zip(together, alone))
    with pytest.raises(ValueError, match="2 settings for 3 images"):
        prune_towers_indexed([pair, second], settings[:2], project)


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


def _without_saliency(tower: TowerOutput) -> TowerOutput:
    return TowerOutput(tower.hidden, None, tower.keys, tower.features)


# The brief's static rule: which methods' selections read the tower's saliency.
READS_SALIENCY = {"promprune", "prunesid", "vispruner", "visionzip", "saliency"}


@pytest.mark.parametrize("method", sorted(m for m, spec in METHODS.items() if set(spec.needs) <= CLS_TOWER_INPUTS))
def test_a_tower_without_saliency_serves_exactly_the_methods_that_never_read_it(method: str) -> None:
    towers = [_tower(64, seed, torch.float32) for seed in (1, 2)]
    order = "spatial" if METHODS[method].merges else "selection"
    settings = [PruneSettings(keep=9, method=method), PruneSettings(ratio=0.5, method=method, order=order)]
    project = _projector(torch.float32)
    instruction = torch.randn(5, project(towers[0].hidden).shape[-1], generator=torch.Generator().manual_seed(3))
    instructions = [instruction if s.reads_instruction else None for s in settings]
    assert {s.reads_saliency(64) for s in settings} == {method in READS_SALIENCY}
    assert not PruneSettings(keep=64, method=method).reads_saliency(64)  # keeps every token: selects nothing
    with torch.inference_mode():
        with_saliency = prune_towers_indexed(towers, settings, project, instructions=instructions)
        if method in READS_SALIENCY:
            with pytest.raises(AssertionError, match="reads saliency"):
                prune_towers_indexed([_without_saliency(t) for t in towers], settings, project)
            return
        without = prune_towers_indexed([_without_saliency(t) for t in towers], settings, project, instructions=instructions)
    assert all(_same(a, b) for a, b in zip(with_saliency, without))


def test_towers_with_and_without_saliency_select_apart_with_the_per_image_result() -> None:
    # Two images of one N: the one whose method reads saliency has it, the other not.
    towers = [_tower(49, 3, torch.float32), _without_saliency(_tower(49, 4, torch.float32))]
    settings = [PruneSettings(keep=7), PruneSettings(keep=7, method="fps")]
    project = _projector(torch.float32)
    with torch.inference_mode():
        together = prune_towers_indexed(towers, settings, project)
        alone = [prune_images_indexed(t, [s], project)[0] for t, s in zip(towers, settings)]
    assert all(_same(a, b) for a, b in zip(together, alone))
    with pytest.raises(ValueError, match="with and without saliency"):
        TowerOutput.cat(towers)


@pytest.mark.parametrize("method", ["promprune", "uniform", "vispruner"])
def test_features_given_by_the_tower_are_the_rows_kept(method: str) -> None:
    tower = TowerOutput.cat([_qwen_like(_tower(81, seed, torch.float32)) for seed in (5, 6)])
    project = _projector(torch.float32)
    settings = [PruneSettings(keep=10, method=method), PruneSettings()]
    with torch.inference_mode():
        projected = project(tower.hidden[:, 1:])
        given = TowerOutput(tower.hidden, tower.saliency, None, projected.clone())
        assert all(_same(a, b) for a, b in zip(prune_images_indexed(given, settings, project),
                                                prune_images_indexed(tower, settings, project)))
        # Rows come from the given features, not from projecting again.
        shifted = TowerOutput(tower.hidden, tower.saliency, None, projected + 1.0)
        pruned, unpruned = prune_images_indexed(shifted, settings, project)
    assert torch.equal(pruned.rows, projected[0, pruned.kept] + 1.0)
    assert torch.equal(unpruned.rows, projected[1] + 1.0)
