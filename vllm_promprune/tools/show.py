"""`vllm-promprune show`: which patches each method keeps on one image, drawn on the image.

Runs the model's own tower and projector through the transformers reference (the
engine's selection inputs, as `calibrate` does), selects with each method exactly as
the engine does (`prune_images_indexed`), and maps every selectable token back to the
rectangle of ORIGINAL image pixels it covers:

- LLaVA-1.5: the processor resizes the short side to 336 and center-crops 336 x 336;
  a token is one 14 px patch of that crop.
- LLaVA-NeXT (`budget_mode: global`): the base view is the whole image squashed to
  336 x 336 (its tokens are large rectangles, drawn as outlines); the crop tokens come
  from the image resized to the best AnyRes resolution, letterboxed and cut into
  336 px crops, minus the padding rows / columns the model drops.
- Qwen-VL: the processor resizes to a multiple of the merged cell (28 px, Qwen3-VL
  32 px); a token is one merged cell.

The figure: the image, the saliency heat map, then one panel per method with the kept
patches shown and the rest dimmed; PromPrune's stage-1 (saliency) picks and stage-2
(coverage) picks in two colours, its spectral entropy Hn and K_sal in the title.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..pruning import CLS_TOWER_INPUTS, CLS_TOWER_NAME, TowerOutput, prune_images_indexed

STAGE_COLOURS = {"saliency": "#ff3b30", "coverage": "#00c7be", "kept": "#ffd60a"}


@dataclass(frozen=True)
class ImageTokens:
    """One image's selectable tokens as the engine sees them, and where they are."""

    tower: TowerOutput  # one image: hidden [1, N + 1, Dv] (row 0: CLS or a zero row), saliency [1, N]
    project: Callable[[torch.Tensor], torch.Tensor]  # [..., Dv] -> [..., D]
    boxes: torch.Tensor  # [N, 4] float (x0, y0, x1, y1) in original image pixels
    outlined: torch.Tensor  # [N] bool: drawn as outlines (LLaVA-NeXT base view), not revealed
    # What the engine's processor validates settings with for this family (defaults: CLIP).
    option_defaults: Mapping[str, object] = field(default_factory=dict)  # e.g. PromPrune's mu
    tower_inputs: frozenset[str] = CLS_TOWER_INPUTS  # the TokenBatch inputs the family's tower provides
    tower_name: str = CLS_TOWER_NAME


def image_tokens(reference: object, image: object) -> ImageTokens:
    """Dispatch on the reference class (see the module docstring for each mapping)."""
    from ..reference import PrunedLlavaNextReference, PrunedLlavaReference, PrunedQwen2VLReference

    if isinstance(reference, PrunedLlavaNextReference):
        return _llava_next_tokens(reference, image)
    if isinstance(reference, PrunedLlavaReference):
        return _llava_tokens(reference, image)
    if isinstance(reference, PrunedQwen2VLReference):
        return _qwen_tokens(reference, image)
    raise TypeError(f"no token geometry for {type(reference).__name__}")


def _patch_boxes(rows: torch.Tensor, cols: torch.Tensor, size: float) -> torch.Tensor:
    """[N, 4] boxes of patches at (rows, cols) of `size` px in processed-image pixels."""
    x0, y0 = cols.double() * size, rows.double() * size
    return torch.stack([x0, y0, x0 + size, y0 + size], dim=1)


def _llava_tokens(reference: object, image: object) -> ImageTokens:
    processor = reference.processor.image_processor
    width, height = image.size
    crop = processor.crop_size["height"]
    short = processor.size["shortest_edge"]
    resized_w, resized_h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    left, top = (resized_w - crop) // 2, (resized_h - crop) // 2
    vision = reference.config.vision_config
    side = vision.image_size // vision.patch_size
    index = torch.arange(side * side)
    boxes = _patch_boxes(index // side, index % side, vision.patch_size)
    boxes += torch.tensor([left, top, left, top], dtype=boxes.dtype)
    boxes[:, 0::2] *= width / resized_w
    boxes[:, 1::2] *= height / resized_h
    tower = reference.tower_output(reference.pixel_values([image]))
    return ImageTokens(tower, reference.model.model.multi_modal_projector, boxes, torch.zeros(len(boxes), dtype=torch.bool))


def _llava_next_tokens(reference: object, image: object) -> ImageTokens:
    from transformers.image_processing_utils import select_best_resolution

    from ..families.anyres import anyres_layout

    width, height = image.size
    vision = reference.config.vision_config
    pinpoints = reference.config.image_grid_pinpoints
    layout = anyres_layout(height, width, pinpoints, vision.image_size, vision.patch_size)
    side, cols = layout.side, layout.grid[1]
    patch = vision.patch_size

    # Crops: the image resized to fit the best resolution (aspect kept), centred in it.
    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    fit = min(best_w / width, best_h / height)
    new_w, new_h = min(math.ceil(width * fit), best_w), min(math.ceil(height * fit), best_h)
    pad_x, pad_y = (best_w - new_w) // 2, (best_h - new_h) // 2
    view, within = layout.content_index // (side * side), layout.content_index % (side * side)
    crop_row, crop_col = (view - 1).clamp_min(0) // cols, (view - 1).clamp_min(0) % cols
    grid_y, grid_x = crop_row * side + within // side, crop_col * side + within % side
    crops = _patch_boxes(grid_y, grid_x, patch) - torch.tensor([pad_x, pad_y, pad_x, pad_y], dtype=torch.float64)
    crops[:, 0::2] *= width / new_w
    crops[:, 1::2] *= height / new_h
    # Base view: the whole image squashed to one view.
    base = _patch_boxes(within // side, within % side, patch)
    base[:, 0::2] *= width / vision.image_size
    base[:, 1::2] *= height / vision.image_size
    is_base = view == 0
    boxes = torch.where(is_base[:, None], base, crops)

    processed = reference.processor.image_processor([image], return_tensors="pt")
    views = reference.tower_output(processed["pixel_values"][0, : layout.num_views].to(reference.model.dtype))
    patches = views.hidden[:, 1:].flatten(0, 1)[layout.content_index]
    keys = views.keys[:, 1:].flatten(0, 1)[layout.content_index]
    tower = TowerOutput(  # `budget_mode: global`: one selection over all content tokens, the base view's CLS
        hidden=torch.cat([views.hidden[0, :1], patches])[None],
        saliency=views.saliency.flatten()[layout.content_index][None],
        keys=torch.cat([views.keys[0, :1], keys])[None],
    )
    return ImageTokens(tower, reference.model.model.multi_modal_projector, boxes, is_base)


def _qwen_tokens(reference: object, image: object) -> ImageTokens:
    from ..families.qwen_vision import QWEN_OPTION_DEFAULTS, QWEN_TOWER_INPUTS, QWEN_TOWER_NAME, merger_projection

    inputs = reference.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
    (tower,) = reference.tower_outputs(inputs["pixel_values"], inputs["image_grid_thw"])
    _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
    visual = reference.model.model.visual
    merge = visual.spatial_merge_size
    cell = merge * reference.config.vision_config.patch_size
    index = torch.arange(grid_h * grid_w // merge**2)
    boxes = _patch_boxes(index // (grid_w // merge), index % (grid_w // merge), cell)
    width, height = image.size
    boxes[:, 0::2] *= width / (grid_w // merge * cell)
    boxes[:, 1::2] *= height / (grid_h // merge * cell)
    return ImageTokens(tower, merger_projection(visual.merger), boxes, torch.zeros(len(boxes), dtype=torch.bool),
                       QWEN_OPTION_DEFAULTS, QWEN_TOWER_INPUTS, QWEN_TOWER_NAME)


@dataclass(frozen=True)
class Selection:
    method: str
    kept: torch.Tensor  # [K] token indices in pick order
    stage: list[str]  # per kept token: "saliency", "coverage" (PromPrune) or "kept"
    title: str


def select(
    tokens: ImageTokens,
    method: str,
    keep: int,
    options: Mapping[str, object] | None = None,
    instruction: torch.Tensor | None = None,
) -> Selection:
    """The tokens `method` keeps on this image, as the engine selects them (pick order);
    `instruction` [M, D]: the question's embeddings (`question_embeddings`), for CDPruner."""
    from ..methods import METHODS
    from ..methods.promprune import spectral_entropy, stage_one_budgets
    from ..settings import parse_image_settings

    if method not in METHODS:
        raise SystemExit(f"show: unknown method {method!r}; one of {sorted(METHODS)}")
    if METHODS[method].merges:
        raise SystemExit(f"show: {method} merges tokens into new ones, so it keeps no set of patches to draw")
    raw = {"keep": keep, "method": method, "order": "selection", **(options or {})}
    try:
        (settings,) = parse_image_settings(raw, 1, option_defaults=tokens.option_defaults)
        settings.check_inputs(tokens.tower_inputs, tokens.tower_name)
    except ValueError as error:
        raise SystemExit(f"show: {error}") from None
    if settings.reads_instruction and instruction is None:
        raise SystemExit(f"show: {method} selects by the question: give --prompt TEXT")
    instructions = [instruction if settings.reads_instruction else None]
    with torch.inference_mode():
        (pruned,) = prune_images_indexed(tokens.tower, [settings], tokens.project, instructions=instructions)
    if pruned.kept is None:
        raise SystemExit(f"show: {method} returns rows that are not patches (e.g. its CLS row) on this model")
    kept = pruned.kept.cpu()
    if method != "promprune":
        return Selection(method, kept, ["kept"] * len(kept), f"{method}: {len(kept)} kept")
    with torch.inference_mode():
        features = tokens.project(tokens.tower.hidden[:, 1:]).float()
        k_sal = int(stage_one_budgets(features, tokens.tower.saliency.float(), len(kept), settings.options_model())[0])
        entropy = float(spectral_entropy(features[0]))
    stage = ["saliency"] * k_sal + ["coverage"] * (len(kept) - k_sal)
    title = f"promprune: Hn {entropy:.3f}, K_sal {k_sal} (red), DPP {len(kept) - k_sal} (teal)"
    return Selection(method, kept, stage, title)


def draw(
    image: object, tokens: ImageTokens, selections: Sequence[Selection], out: Path, caption: str = "", dpi: int = 110
) -> Path:
    """The figure: image, saliency heat map, one panel per selection; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    height, width = pixels.shape[:2]
    boxes = tokens.boxes.clamp_min(0).numpy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(max=height)
    panels = 2 + len(selections)
    rows = math.ceil(panels / 5)  # at most five panels a row, rows filled evenly
    columns = math.ceil(panels / rows)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.2 * rows * height / width + 0.6 * rows),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")

    def pixel_slices(box: np.ndarray) -> tuple[slice, slice]:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))

    axes.flat[0].imshow(pixels)
    axes.flat[0].set_title(f"image {width}x{height}, {len(boxes)} tokens", fontsize=9)

    saliency = tokens.tower.saliency[0].float().cpu().numpy()
    heat = np.full((height, width), np.nan, dtype=np.float32)
    fine = ~tokens.outlined.numpy()  # LLaVA-NeXT: the crops' tokens tile the image; the base view overlaps them
    for box, value in zip(boxes[fine], saliency[fine]):
        heat[pixel_slices(box)] = value
    axes.flat[1].imshow(pixels * 0.35)
    shown = axes.flat[1].imshow(heat, cmap="inferno", alpha=0.75)
    figure.colorbar(shown, ax=axes.flat[1], fraction=0.046, pad=0.02)
    axes.flat[1].set_title("saliency" + (" (crop tokens)" if not fine.all() else ""), fontsize=9)

    for axis, selection in zip(axes.flat[2:], selections):
        revealed = pixels * 0.25
        outlines = []
        for index, stage in zip(selection.kept.tolist(), selection.stage):
            if tokens.outlined[index]:
                outlines.append((boxes[index], stage))
                continue
            rows_slice, cols_slice = pixel_slices(boxes[index])
            revealed[rows_slice, cols_slice] = pixels[rows_slice, cols_slice]
        axis.imshow(revealed)
        for index, stage in zip(selection.kept.tolist(), selection.stage):
            x0, y0, x1, y1 = boxes[index]
            outlined = bool(tokens.outlined[index])
            axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=STAGE_COLOURS[stage],
                                     linewidth=1.2 if outlined else 0.6, linestyle="--" if outlined else "-"))
        title = selection.title + (f"\n(base-view picks dashed: {len(outlines)})" if tokens.outlined.any() else "")
        axis.set_title(title, fontsize=9)
    if caption:
        figure.suptitle(caption, fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi)
    plt.close(figure)
    return out


SAMPLE_PREFIX = "sample:"
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket")
"""Freely licensed photographs shipped in scikit-image (the `samples` extra), by name."""


def load_image(spec: str) -> object:
    """An RGB PIL image from a file path, or `sample:NAME` for one of `SAMPLES`."""
    from PIL import Image

    if spec.startswith(SAMPLE_PREFIX):
        name = spec.removeprefix(SAMPLE_PREFIX)
        if name not in SAMPLES:
            raise SystemExit(f"show: unknown sample {name!r}; one of {', '.join(SAMPLES)}")
        try:
            from skimage import data
        except ImportError:
            raise SystemExit("show: sample images need scikit-image: pip install -e '.[samples]'") from None
        return Image.fromarray(getattr(data, name)()).convert("RGB")
    if not Path(spec).is_file():
        raise SystemExit(f"show: {spec}: no such image file (or use {SAMPLE_PREFIX}NAME, NAME in {', '.join(SAMPLES)})")
    with Image.open(spec) as opened:
        return opened.convert("RGB")


def question_embeddings(reference: object, question: str) -> torch.Tensor:
    """The instruction the engine derives for a chat message of the image and `question`
    (the checkpoint's chat template applied, `pruning.instruction_tokens`), embedded by the
    model's input embeddings: [M, D] float32."""
    from ..reference import instruction_embeddings
    from ..settings import PruneSettings

    processor = reference.processor
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(message, add_generation_prompt=True)
    prompt_ids = processor.tokenizer(prompt).input_ids
    reads = PruneSettings(keep=1, method="cdpruner")
    with torch.inference_mode():
        (embedded,) = instruction_embeddings(reference.model, processor, prompt_ids, [reads])
    return embedded


def main(args: argparse.Namespace) -> None:
    from ..reference import load_reference

    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    if not methods:
        raise SystemExit("show: --methods needs at least one method")
    image = load_image(args.image)
    reference = load_reference(args.model)
    tokens = image_tokens(reference, image)
    if not 1 <= args.keep < len(tokens.boxes):
        raise SystemExit(f"show: --keep must be between 1 and {len(tokens.boxes) - 1} for this image")
    instruction = None if args.prompt is None else question_embeddings(reference, args.prompt)
    selections = [select(tokens, method, args.keep, instruction=instruction) for method in methods]
    caption = f"{args.model}: keep {args.keep} of {len(tokens.boxes)}"
    if args.prompt is not None:
        caption += f'; question "{args.prompt}"'
    out = draw(image, tokens, selections, Path(args.out), caption=caption, dpi=args.dpi)
    for selection in selections:
        print(f"{selection.title}")
    print(f"wrote {out}")
