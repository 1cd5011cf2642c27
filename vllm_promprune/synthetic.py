"""Seeded synthetic images for tests, demos and benchmarks (no data sets offline).

A smooth two-axis colour gradient with a few solid rectangles: structured
enough that token saliency and diversity have clear winners, unlike pixel
noise, where every selection is a near-tie that float rounding can flip.
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
