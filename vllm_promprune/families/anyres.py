"""LLaVA-NeXT AnyRes layout and pruning of one multi-view image (no vLLM import).

An AnyRes image runs through the vision tower as V = 1 + R*C views of side x side
patches: the base view (whole image resized) and the R x C crops of the best-fit
pinpoint resolution, row-major. The stock LLM sequence for the image is the base
view's side^2 tokens, then the full-resolution grid (R*side rows x C*side columns)
with the letterbox padding rows or columns removed ("unpad"), each remaining grid
row followed by one learned `image_newline` embedding.

Pruning works on the image's CONTENT tokens: the base view plus the unpadded grid,
in that sequence order. Newline embeddings are layout markers, not image content:
they are never selection candidates, and a pruned image returns its K selected
tokens and no newline. A budget that keeps every content token is not pruning:
the image then gets the stock sequence, newlines included.

Budget modes:
- `global`: one selection over all content tokens (base and grid compete);
  the base view's CLS token is the image's CLS (saliency is each view's own CLS
  attention, so scores of different views are compared directly).
- `per_crop`: K is split over the views in proportion to their content tokens
  (largest remainder, ties to the earlier view) and each view is selected on its
  own with its own CLS; the output is the base's tokens, then crop 1, crop 2, ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.image_processing_utils import select_best_resolution

from ..pruning import Instructions, SelectionFailureHandler, TowerOutput, plan_budgets, prune_images
from ..settings import PruneSettings


@dataclass(frozen=True)
class AnyResLayout:
    """Where an AnyRes image's content tokens come from in the tower output."""

    side: int  # patches per view side (24 for CLIP-L/336)
    grid: tuple[int, int]  # crops (rows R, columns C)
    content_index: torch.Tensor  # [N_content] index into the [V * side^2] patch tokens, sequence order
    view_of: torch.Tensor  # [N_content] view of each content token (0 = base, 1 + r*C + c = crop)
    num_newlines: int  # unpadded grid rows = newline embeddings in the stock sequence

    @property
    def num_views(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def num_content(self) -> int:
        return int(self.content_index.numel())

    @property
    def num_stock_tokens(self) -> int:
        """Placeholders of the unpruned image (content + newlines)."""
        return self.num_content + self.num_newlines

    def view_sizes(self) -> list[int]:
        return torch.bincount(self.view_of, minlength=self.num_views).tolist()


def unpadded_window(height: int, width: int, grid_height: int, grid_width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the image inside a letterboxed grid.

    Same arithmetic as LLaVA-NeXT's `unpad_image` (rounding included), so the
    kept rows/columns are exactly the ones the stock model keeps.
    """
    if width / height > grid_width / grid_height:
        new_height = int(round(height * (grid_width / width), 7))
        padding = (grid_height - new_height) // 2
        return padding, grid_height - padding, 0, grid_width
    new_width = int(round(width * (grid_height / height), 7))
    padding = (grid_width - new_width) // 2
    return 0, grid_height, padding, grid_width - padding


def anyres_layout(
    height: int, width: int, pinpoints: Sequence[Sequence[int]], view_size: int, patch_size: int
) -> AnyResLayout:
    """Layout of an image of `height` x `width` pixels.

    Args:
        pinpoints: the config's `image_grid_pinpoints`, (height, width) pairs.
        view_size: the tower's input side in pixels (336); patch_size: 14.
    """
    side = view_size // patch_size
    best_height, best_width = select_best_resolution((height, width), [list(p) for p in pinpoints])
    rows, cols = best_height // view_size, best_width // view_size
    top, bottom, left, right = unpadded_window(height, width, rows * side, cols * side)
    y = torch.arange(top, bottom)[:, None]
    x = torch.arange(left, right)[None, :]
    view = 1 + (y // side) * cols + x // side
    flat = view * side * side + (y % side) * side + x % side
    base = torch.arange(side * side)
    return AnyResLayout(
        side=side,
        grid=(rows, cols),
        content_index=torch.cat([base, flat.flatten()]),
        view_of=torch.cat([torch.zeros_like(base), view.flatten()]),
        num_newlines=bottom - top,
    )


def split_budget(keep: int, sizes: Sequence[int]) -> list[int]:
    """Split `keep` over views of `sizes` tokens in proportion, summing to `keep`.

    Largest-remainder rounding; equal remainders go to the earlier view. Each
    share is at most its view's size when keep <= sum(sizes).
    """
    total = sum(sizes)
    shares = [keep * size // total for size in sizes]
    remainders = sorted(range(len(sizes)), key=lambda v: (-(keep * sizes[v] % total), v))
    for view in remainders[: keep - sum(shares)]:
        shares[view] += 1
    return shares


def prune_anyres(
    tower: TowerOutput,
    layout: AnyResLayout,
    settings: PruneSettings,
    project: Callable[[torch.Tensor], torch.Tensor],
    on_selection: Callable[[str, float], None] | None = None,
    on_failure: SelectionFailureHandler | None = None,
    instruction: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pruned image's LLM embeddings [K, D] from its V tower views (one image of
    `prune_anyres_images`)."""
    return prune_anyres_images([(tower, layout, settings)], project, on_selection, on_failure, [instruction])[0]


def prune_anyres_images(
    images: Sequence[tuple[TowerOutput, AnyResLayout, PruneSettings]],
    project: Callable[[torch.Tensor], torch.Tensor],
    on_selection: Callable[[str, float], None] | None = None,
    on_failure: SelectionFailureHandler | None = None,
    instructions: Instructions | None = None,
) -> list[torch.Tensor]:
    """Each pruned image's LLM embeddings [K_i, D] from its V_i tower views.

    Per image, `tower` holds its views: hidden [V, side^2 + 1, Dv] (CLS first),
    saliency [V, side^2], keys [V, side^2 + 1, Dk]. Call only with images whose
    `settings.prunes(layout.num_content)`. The callbacks are `prune_images`'; an image's
    instruction embeddings (CDPruner) serve each of its selections (every crop in `per_crop`).

    Every selection (the whole image in `global` mode, one view in `per_crop`) with
    the same number of candidates runs in one batch, across views and images (e.g.
    the 5 views of a square image, or two images of the same layout); `prune_images`
    groups that batch by settings, so each image gets what it would get alone.
    """
    parts: list[tuple[int, int, torch.Tensor, PruneSettings]] = []  # (image, view, index, settings)
    for image, (tower, layout, settings) in enumerate(images):
        if settings.needs_plan:  # the engine's planning pass: decide the budget from the content tokens
            content = tower.hidden[:, 1:].flatten(0, 1)[layout.content_index][None]
            settings = plan_budgets([settings], content, lambda content=content: project(content))[0]
        keep = settings.kept_tokens(layout.num_content)
        if settings.budget_mode == "global":
            parts.append((image, 0, layout.content_index, settings.model_copy(update={"keep": keep, "ratio": None})))
            continue
        for view, share in enumerate(split_budget(keep, layout.view_sizes())):
            if share > 0:
                index = layout.content_index[layout.view_of == view]
                parts.append((image, view, index, settings.model_copy(update={"keep": share, "ratio": None})))

    flat = [
        (tower.hidden[:, 1:].flatten(0, 1), tower.saliency.flatten(), tower.keys[:, 1:].flatten(0, 1))
        for tower, _, _ in images
    ]
    batches: dict[int, list[int]] = {}  # candidates -> parts
    for part, (_, _, index, _) in enumerate(parts):
        batches.setdefault(len(index), []).append(part)
    rows: list[torch.Tensor | None] = [None] * len(parts)
    for members in batches.values():
        selected = [parts[m] for m in members]
        batch = TowerOutput(
            hidden=torch.stack([torch.cat([images[i][0].hidden[v, :1], flat[i][0][index]]) for i, v, index, _ in selected]),
            saliency=torch.stack([flat[i][1][index] for i, _, index, _ in selected]),
            keys=torch.stack([torch.cat([images[i][0].keys[v, :1], flat[i][2][index]]) for i, v, index, _ in selected]),
        )
        part_instructions = None if instructions is None else [instructions[i] for i, _, _, _ in selected]
        pruned = prune_images(batch, [s for _, _, _, s in selected], project, on_selection, on_failure, part_instructions)
        for member, member_rows in zip(members, pruned):
            rows[member] = member_rows
    return [
        torch.cat([part_rows for (image, _, _, _), part_rows in zip(parts, rows) if image == wanted])  # type: ignore[misc]
        for wanted in range(len(images))
    ]
