"""`vllm-promprune calibrate`: PromPrune's mu and the adaptive budgets' phi_ref for a model and its images.

The paper sets mu to the median normalised spectral entropy of the projected visual
tokens over a calibration set (then a small grid search on quality). This command
computes that median with the model's own tower and projector, through the
transformers reference (`vllm_promprune.reference`): the same tokens, saliency and
entropy the engine's split sees (the engine is tested against that reference), with no
server to start. It loads the full model once, on the CPU: for a 7B model use a
machine with the memory for it and a modest image set.

The same pass measures each image's phi = 1 - rho (PruneSID-Dyn's information score,
the mean pairwise cosine rho of the pre-projector patch tokens, as the engine's planning
pass computes it): its median is `phi_ref`, the reference of adaptive budgets
(`keep_mode: "adaptive"`, `prunesid_dyn`), and the median spectral entropy (mu) is
`entropy_ref`.

Writes `calibration.json` (per image: tokens, phi, spectral / attention / feature-norm
entropy and K_sal at the recommended mu; their distributions; the recommended mu and
phi_ref) and `entropy_histogram.png` (spectral entropy, mu marked) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
ENTROPIES = ("spectral_entropy", "attention_entropy", "feature_norm_entropy")
MEASURES = ("phi", *ENTROPIES)


def image_paths(folder: Path) -> list[Path]:
    """The images directly in `folder`, sorted by name; SystemExit if there are none."""
    if not folder.is_dir():
        raise SystemExit(f"--images {folder}: not a directory")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"--images {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def distribution(values: Sequence[float]) -> dict[str, float]:
    """min, deciles 10/90, quartiles, median, max and mean of `values`."""
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=20, method="inclusive") if len(ordered) > 1 else ordered * 19
    return {
        "min": ordered[0], "p10": cuts[1], "p25": cuts[4], "median": statistics.median(ordered),
        "p75": cuts[14], "p90": cuts[17], "max": ordered[-1], "mean": statistics.fmean(ordered),
    }


def measure(reference: object, paths: Sequence[Path]) -> list[dict[str, object]]:
    """Per image: token count, phi (`pruning.image_complexity`) and the three normalised entropies (float32 values)."""
    from PIL import Image

    from ..methods.promprune import attention_entropy, feature_norm_entropy, spectral_entropy
    from ..pruning import image_complexity

    rows = []
    for path in paths:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        patches, projected, saliency = reference.split_inputs(image)
        with torch.inference_mode():
            rows.append({
                "image": str(path),
                "tokens": int(projected.shape[0]),
                "phi": image_complexity("phi", patches, lambda projected=projected: projected),
                "spectral_entropy": float(spectral_entropy(projected)),
                "attention_entropy": float(attention_entropy(saliency)),
                "feature_norm_entropy": float(feature_norm_entropy(projected)),
            })
    return rows


def calibrate(rows: list[dict[str, object]], keep: int, tau: float) -> dict[str, object]:
    """The report: recommended mu (median spectral entropy) and phi_ref (median phi),
    distributions, K_sal per image."""
    from ..methods.promprune import PromPruneOptions, saliency_budget

    mu = statistics.median(row["spectral_entropy"] for row in rows)
    options = PromPruneOptions(mu=mu, tau=tau)
    for row in rows:
        # float -> float32 is exact here: the entropies were float32 values.
        row["k_sal"] = saliency_budget(torch.tensor(row["spectral_entropy"]), min(keep, row["tokens"]), options)
    return {
        "recommended_mu": mu,
        "recommended_phi_ref": statistics.median(row["phi"] for row in rows),
        "keep": keep,
        "tau": tau,
        "images": len(rows),
        "distributions": {name: distribution([row[name] for row in rows]) for name in MEASURES},
        "k_sal": distribution([row["k_sal"] for row in rows]),
        "per_image": rows,
    }


def histogram(report: dict[str, object], out: Path) -> Path:
    """Histogram of the spectral entropies with the recommended mu marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [row["spectral_entropy"] for row in report["per_image"]]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    axis.hist(values, bins=min(30, max(5, len(values) // 2)), color="#4c72b0", alpha=0.85)
    axis.axvline(report["recommended_mu"], color="#c44e52", linewidth=2, label=f"mu = {report['recommended_mu']:.4f} (median)")
    axis.set(xlabel="normalised spectral entropy of the projected tokens", ylabel="images",
             title=f"{report['images']} images")
    axis.legend()
    axis.grid(alpha=0.3)
    path = out / "entropy_histogram.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def main(args: argparse.Namespace) -> None:
    from ..reference import load_reference

    paths = image_paths(Path(args.images))
    if args.keep < 1:
        raise SystemExit(f"--keep must be an integer >= 1, got {args.keep}")
    if args.tau <= 0:
        raise SystemExit(f"--tau must be > 0, got {args.tau}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = calibrate(measure(load_reference(args.model), paths), args.keep, args.tau)
    (out / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    spectral = report["distributions"]["spectral_entropy"]
    print(f"{report['images']} images; spectral entropy min {spectral['min']:.4f}, median {spectral['median']:.4f}, "
          f"max {spectral['max']:.4f}")
    print(f"recommended mu: {report['recommended_mu']:.4f} (set it as the server default or per request: "
          f'{{"mu": {report["recommended_mu"]:.4f}}})')
    phi = report["distributions"]["phi"]
    print(f"phi = 1 - rho: min {phi['min']:.4f}, median {phi['median']:.4f}, max {phi['max']:.4f}")
    print(f"recommended phi_ref: {report['recommended_phi_ref']:.4f} (adaptive budgets' reference, e.g. "
          f'{{"method": "prunesid_dyn", "keep": 64, "phi_ref": {report["recommended_phi_ref"]:.4f}}}; '
          f"entropy_ref for complexity 'spectral_entropy' is mu)")
    k_sal = report["k_sal"]
    print(f"K_sal of keep={args.keep} at tau={args.tau}: min {k_sal['min']:.0f}, median {k_sal['median']:.0f}, "
          f"max {k_sal['max']:.0f}")
    print(f"wrote {out / 'calibration.json'}")
    print(f"wrote {histogram(report, out)}")
