"""Seeded synthetic images for tests, demos and benchmarks (no data sets offline).

- `scene_image`: a smooth two-axis colour gradient with a few solid rectangles, for
  demos and for tests that do not compare selections across frameworks. Its flat
  and smooth regions give many identical or near-identical visual tokens, whose
  order float rounding decides.
- `textured_image`: seeded pixel noise around a seeded base colour, for tests that
  compare vLLM's pruned output with the transformers reference: every visual token
  is distinct, so selections there have margins far above the rounding by which the
  two pipelines differ (see its docstring for the measurements).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def scene_image(seed: int, width: int = 336, height: int = 336, rectangles: int = 6) -> Image.Image:
    """An RGB image determined by `seed`."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height)[:, None]
    cols = np.linspace(0.0, 1.0, width)[None, :]
    pixels = np.stack(
        [
            np.broadcast_to(rows * rng.uniform(50, 200), (height, width)),
            np.broadcast_to(cols * rng.uniform(50, 200), (height, width)),
            np.full((height, width), rng.uniform(0, 255)),
        ],
        axis=-1,
    )
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rectangles):
        x0 = int(rng.integers(0, max(1, width - 56)))
        y0 = int(rng.integers(0, max(1, height - 56)))
        w, h = (int(v) for v in rng.integers(20, 120, 2))
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def textured_image(seed: int, width: int = 336, height: int = 336) -> Image.Image:
    """An RGB image determined by `seed`: a base colour plus independent pixel noise.

    Each channel is base + U(-64, 64) per pixel, base ~ U(64, 191) per channel and
    image (rounded, never clipped). Every patch is different, so no two visual
    tokens are near-duplicates: on the tiny test checkpoints the largest cosine
    between two LLaVA pre-projector patch tokens is ~0.93 (`scene_image`: 0.9998).
    The shared base colour matters too: full-range noise without it makes the
    tokens nearly orthogonal (mean cosine ~0.09 instead of ~0.55), so greedy DPP
    gains sit within a few float32 steps of 1 and its steps tie again (smallest
    best-vs-second gain gap over 64 LLaVA DPP steps, 12 seeds: 0..4e-6, median
    ~6e-7; here 1e-6..4e-4, median ~4e-5).

    Measured (2026-12-01, tiny checkpoints, CPU, the engine tests' images): vLLM and
    the transformers reference compute the tower outputs within 4.6e-6 (hidden
    states, Qwen merger inputs), 5.8e-10 (CLS / received attention) and 2.4e-7
    (projected features) max abs, and the engine tests' selections first change
    under noise 2x to >100x a jitter that is itself >= 10x those differences (the
    `test_reference_cases_have_margins` guards). No image helps selections whose
    margins are thin by construction: VisPruner's pairs over a long residual list
    (its order is the whole attention ranking) or greedy DPP picks beyond the
    feature width (residual gains ~0).
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(64, 191, 3)
    pixels = base + 128 * rng.uniform(-0.5, 0.5, (height, width, 3))
    return Image.fromarray(pixels.round().astype(np.uint8))
