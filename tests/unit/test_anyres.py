"""AnyRes layout (LLaVA-NeXT): content tokens, newlines and per-crop budgets.

The layout is checked against transformers' own `pack_image_features` on
features that encode their origin, for every pinpoint grid and padded shapes.
"""

from __future__ import annotations

import pytest
import torch

from vllm_promprune.families.anyres import anyres_layout, prune_anyres, prune_anyres_images, split_budget
from vllm_promprune.pruning import TowerOutput
from vllm_promprune.settings import parse_settings
from vllm_promprune.testing.checkpoints import ANYRES_PINPOINTS

SIDE = 24
# (height, width): square, wide, tall, the three letterboxed orientations and odd sizes.
IMAGE_SIZES = [(672, 672), (336, 1008), (1008, 336), (336, 672), (672, 336), (300, 1000), (1000, 300),
               (480, 640), (640, 480), (500, 503), (17, 900), (123, 456)]


class _PackingConfig:
    def __init__(self) -> None:
        from transformers import CLIPVisionConfig

        self.vision_config = CLIPVisionConfig(image_size=336, patch_size=14)
        self.image_grid_pinpoints = ANYRES_PINPOINTS


def _hf_packed(height: int, width: int, num_views: int) -> torch.Tensor:
    """transformers' packed sequence for features whose value is their flat tower index (-1 = newline)."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    features = torch.arange(num_views * SIDE * SIDE, dtype=torch.float64).view(num_views, SIDE * SIDE, 1)
    holder = type("Holder", (), {"config": _PackingConfig()})()
    (packed,), lengths = LlavaNextModel.pack_image_features(
        holder, [features], torch.tensor([[height, width]]), "default", torch.tensor([-1.0], dtype=torch.float64)
    )
    assert lengths.tolist() == [packed.shape[0]]
    return packed[:, 0]


@pytest.mark.parametrize(("height", "width"), IMAGE_SIZES)
def test_layout_matches_transformers_packing(height: int, width: int) -> None:
    layout = anyres_layout(height, width, ANYRES_PINPOINTS, 336, 14)
    packed = _hf_packed(height, width, layout.num_views)
    is_newline = packed == -1
    assert layout.num_stock_tokens == packed.numel()
    assert layout.num_newlines == int(is_newline.sum())
    assert packed[~is_newline].long().tolist() == layout.content_index.tolist()
    assert layout.view_of.tolist() == (layout.content_index // (SIDE * SIDE)).tolist()


def test_square_image_has_four_full_crops() -> None:
    layout = anyres_layout(672, 672, ANYRES_PINPOINTS, 336, 14)
    assert layout.grid == (2, 2)
    assert layout.num_content == 5 * 576 and layout.num_newlines == 48
    assert layout.view_sizes() == [576] * 5


@pytest.mark.parametrize(
    ("keep", "sizes", "expected"),
    [(320, [576] * 5, [64] * 5), (10, [576, 288, 288], [5, 3, 2]), (3, [576] * 5, [1, 1, 1, 0, 0]),
     (6, [4, 1, 1], [4, 1, 1]), (5, [4, 1, 1], [3, 1, 1]), (1, [576, 576], [1, 0])],
)
def test_split_budget_is_proportional_largest_remainder(keep: int, sizes: list[int], expected: list[int]) -> None:
    assert split_budget(keep, sizes) == expected


@pytest.mark.parametrize(("height", "width"), IMAGE_SIZES)
@pytest.mark.parametrize("keep", [1, 5, 64, 320])
def test_split_budget_sums_and_fits(height: int, width: int, keep: int) -> None:
    sizes = anyres_layout(height, width, ANYRES_PINPOINTS, 336, 14).view_sizes()
    shares = split_budget(keep, sizes)
    assert sum(shares) == keep
    assert all(0 <= share <= size for share, size in zip(shares, sizes))


def _tower(num_views: int, seed: int) -> TowerOutput:
    generator = torch.Generator().manual_seed(seed)
    return TowerOutput(
        hidden=torch.randn(num_views, SIDE * SIDE + 1, 8, generator=generator),
        saliency=torch.rand(num_views, SIDE * SIDE, generator=generator),
        keys=torch.randn(num_views, SIDE * SIDE + 1, 4, generator=generator),
    )


def test_global_saliency_picks_top_scores_over_all_views_in_sequence_order() -> None:
    layout = anyres_layout(336, 1008, ANYRES_PINPOINTS, 336, 14)  # 1 x 3 crops, letterboxed
    tower = _tower(layout.num_views, 0)
    rows = prune_anyres(tower, layout, parse_settings({"keep": 40, "method": "saliency"}), lambda x: x)
    scores = tower.saliency.flatten()[layout.content_index]
    expected = scores.topk(40).indices.sort().values
    patches = tower.hidden[:, 1:].flatten(0, 1)[layout.content_index]
    assert torch.equal(rows, patches[expected])


def test_per_crop_selects_each_view_on_its_own_share() -> None:
    layout = anyres_layout(672, 672, ANYRES_PINPOINTS, 336, 14)
    tower = _tower(layout.num_views, 1)
    tower.saliency[1:] *= 0.01  # globally, the base view would win every pick
    settings = parse_settings({"keep": 50, "method": "saliency", "budget_mode": "per_crop"})
    rows = prune_anyres(tower, layout, settings, lambda x: x)
    expected = []
    for view, share in enumerate(split_budget(50, layout.view_sizes())):
        picked = tower.saliency[view].topk(share).indices.sort().values
        expected.append(tower.hidden[view, 1:][picked])
    assert torch.equal(rows, torch.cat(expected))
    global_rows = prune_anyres(tower, layout, parse_settings({"keep": 50, "method": "saliency"}), lambda x: x)
    assert torch.equal(global_rows, tower.hidden[0, 1:][tower.saliency[0].topk(50).indices.sort().values])


def test_per_crop_with_cls_methods_use_each_views_cls() -> None:
    layout = anyres_layout(672, 672, ANYRES_PINPOINTS, 336, 14)
    tower = _tower(layout.num_views, 2)
    settings = parse_settings({"keep": 50, "method": "prunesid", "budget_mode": "per_crop"})
    rows = prune_anyres(tower, layout, settings, lambda x: x)
    assert rows.shape == (50, 8)
    for view in range(layout.num_views):  # PruneSID keeps each view's CLS first
        assert any(torch.equal(row, tower.hidden[view, 0]) for row in rows)


@pytest.mark.parametrize("budget_mode", ["global", "per_crop"])
def test_images_of_one_layout_select_as_one_batch_equal_to_each_alone(budget_mode: str, monkeypatch) -> None:
    """Two same-layout images with the same settings cost the selections of one; a third
    with another budget and a fourth of another layout run apart; every image's rows equal
    a call on it alone."""
    import vllm_promprune.pruning as pruning

    square, wide = anyres_layout(672, 672, ANYRES_PINPOINTS, 336, 14), anyres_layout(336, 1008, ANYRES_PINPOINTS, 336, 14)
    settings = [parse_settings({"keep": keep, "method": "divprune", "budget_mode": budget_mode}) for keep in (50, 50, 30, 50)]
    images = [(_tower(layout.num_views, seed), layout, s)
              for seed, (layout, s) in enumerate(zip([square, square, square, wide], settings))]
    alone = [prune_anyres(*image, lambda x: x) for image in images]

    calls: list[int] = []
    reduce_tokens = pruning.reduce_tokens

    def counting(method, batch, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(batch.features.shape[0])
        return reduce_tokens(method, batch, *args, **kwargs)

    monkeypatch.setattr(pruning, "reduce_tokens", counting)
    together = prune_anyres_images(images, lambda x: x)
    for ours, theirs in zip(together, alone, strict=True):
        assert torch.equal(ours, theirs)

    def selections(image: tuple) -> set[tuple[int, int]]:  # (candidates, keep) of each selection
        _, layout, image_settings = image
        keep = image_settings.kept_tokens(layout.num_content)
        if budget_mode == "global":
            return {(layout.num_content, keep)}
        return {(int((layout.view_of == view).sum()), share)
                for view, share in enumerate(split_budget(keep, layout.view_sizes())) if share > 0}

    assert len(calls) == len(set().union(*map(selections, images)))
    assert len(calls) < sum(len(selections(image)) for image in images)
