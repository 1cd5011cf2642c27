"""`vllm-promprune calibrate` end to end on the tiny checkpoints of every family."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from vllm_promprune.methods import spectral_entropy
from vllm_promprune.testing.synthetic import scene_image, textured_image
from vllm_promprune.tools.cli import main

# family -> (checkpoint fixture, image size (w, h), selectable tokens of that image)
FAMILIES = {
    "llava": ("tiny_llava", (336, 336), 576),
    "llava-next": ("tiny_llava_next", (672, 672), 2880),  # base view + 2 x 2 crops, no newlines
    "qwen2.5-vl": ("tiny_qwen2_5_vl", (448, 448), 256),
    "qwen2-vl": ("tiny_qwen2_vl", (448, 448), 256),
    "qwen3-vl": ("tiny_qwen3_vl", (512, 512), 256),  # patch 16: 32 px merged tokens
    "qwen3-vl-moe": ("tiny_qwen3_vl_moe", (512, 512), 256),
}


def _transformers_features(model_dir: Path, family: str, image: object) -> torch.Tensor | None:
    """The image's projected tokens through transformers' own `get_image_features` (the
    split's input, computed without the plugin), or None where it packs them differently."""
    import transformers

    if family not in ("llava", "qwen2-vl", "qwen3-vl"):
        return None
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = getattr(transformers, config.architectures[0]).from_pretrained(model_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    inputs = processor.image_processor([image], return_tensors="pt")
    with torch.inference_mode():
        if family == "llava":
            output = model.model.get_image_features(inputs["pixel_values"])
        else:
            output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    features = output.pooler_output if hasattr(output, "pooler_output") else output
    return (features[0] if isinstance(features, (list, tuple)) else features).reshape(-1, features[0].shape[-1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_calibrate_writes_mu_distributions_and_histogram(family: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    fixture, (width, height), tokens = FAMILIES[family]
    model_dir = request.getfixturevalue(fixture)
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        textured_image(seed, width, height).save(images / f"textured-{seed}.png")
        scene_image(seed, width, height).save(images / f"scene-{seed}.jpg")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"

    main(["calibrate", str(model_dir), "--images", str(images), "--keep", "16", "--out", str(out)])

    report = json.loads((out / "calibration.json").read_text())
    assert (out / "entropy_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report["per_image"]
    assert report["images"] == len(rows) == 6 and {Path(row["image"]).suffix for row in rows} == {".png", ".jpg"}
    assert all(row["tokens"] == tokens for row in rows)
    assert report["recommended_mu"] == statistics.median(row["spectral_entropy"] for row in rows)
    assert report["recommended_phi_ref"] == statistics.median(row["phi"] for row in rows)
    assert len({row["phi"] for row in rows}) == 6 and all(0.0 < row["phi"] <= 2.0 for row in rows)
    assert all(0.0 <= row[name] <= 1.0 for row in rows for name in ("spectral_entropy", "attention_entropy"))
    assert all(0 <= row["k_sal"] <= 16 for row in rows)
    expected = _transformers_features(model_dir, family, textured_image(0, width, height))
    if expected is not None:
        (row,) = [row for row in rows if Path(row["image"]).name == "textured-0.png"]
        assert row["spectral_entropy"] == pytest.approx(float(spectral_entropy(expected)), abs=1e-5)


def test_calibrate_refuses_a_folder_without_images(tiny_llava: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no images"):
        main(["calibrate", str(tiny_llava), "--images", str(tmp_path), "--out", str(tmp_path / "out")])
