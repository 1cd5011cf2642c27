"""`vllm-promprune show`: the patch-to-pixel mapping of every family, the figure end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_promprune.tools.cli import main

FAMILIES = {"llava": "tiny_llava", "llava-next": "tiny_llava_next", "qwen2.5-vl": "tiny_qwen2_5_vl",
            "qwen3-vl": "tiny_qwen3_vl"}
# Sizes that exercise crops on both axes, letterboxing (LLaVA-NeXT) and non-multiple resizes (Qwen).
IMAGE_SIZES = [(500, 380), (380, 500), (900, 300)]


def position_coloured_image(width: int, height: int) -> Image.Image:
    """Every pixel numbered by its colour: red = its column, green = its row (0..255 across
    the image), blue constant. Resizing keeps these ramps, so any processed pixel's colour
    says where in the original image it came from."""
    x = np.round(np.linspace(0, 255, width))[None, :].repeat(height, 0)
    y = np.round(np.linspace(0, 255, height))[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8))


def processed_token_centres(reference, family: str, image: Image.Image) -> torch.Tensor:
    """[N, 2] where each selectable token's pixels came from in the original image, read
    from the colours of the pixels the model's own processor gives that token."""
    processor = reference.processor.image_processor
    mean, std = torch.tensor(processor.image_mean)[:, None], torch.tensor(processor.image_std)[:, None]
    width, height = image.size
    if family == "llava":
        pixels = processor([image], return_tensors="pt")["pixel_values"][0]
        patch = reference.config.vision_config.patch_size
        side = pixels.shape[-1] // patch
        tokens = pixels.reshape(3, side, patch, side, patch).permute(1, 3, 0, 2, 4).reshape(side * side, 3, -1)
    elif family == "llava-next":
        from vllm_promprune.families.anyres import anyres_layout

        pixels = processor([image], return_tensors="pt")["pixel_values"][0]
        vision = reference.config.vision_config
        layout = anyres_layout(height, width, reference.config.image_grid_pinpoints, vision.image_size, vision.patch_size)
        patch, side, views = vision.patch_size, layout.side, layout.num_views
        every = pixels[:views].reshape(views, 3, side, patch, side, patch).permute(0, 2, 4, 1, 3, 5)
        tokens = every.reshape(-1, 3, patch * patch)[layout.content_index]
    else:  # Qwen: rows are patches, 4 consecutive rows one merged token
        pixels = reference.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image],
                                     return_tensors="pt")["pixel_values"]
        tokens = pixels.reshape(-1, 4, 3, pixels.shape[1] // 3).permute(0, 2, 1, 3).reshape(len(pixels) // 4, 3, -1)
    colour = (tokens * std + mean).mean(dim=-1)  # [N, 3] in 0..1: the mean over a linear ramp = its centre
    return torch.stack([colour[:, 0] * (width - 1), colour[:, 1] * (height - 1)], dim=1).double()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patches_map_back_to_the_original_pixels(family: str, request: pytest.FixtureRequest) -> None:
    from vllm_promprune.reference import load_reference
    from vllm_promprune.tools.show import image_tokens

    reference = load_reference(request.getfixturevalue(FAMILIES[family]))
    for width, height in IMAGE_SIZES:
        image = position_coloured_image(width, height)
        tokens = image_tokens(reference, image)
        boxes = tokens.boxes
        centres = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)
        measured = processed_token_centres(reference, family, image)
        assert len(boxes) == len(measured) == tokens.tower.saliency.shape[1]
        # Measured here: <= 1.1 px (8-bit colour steps); one patch off would be >= 10 px.
        assert float((centres - measured).abs().max()) < 1.5, (family, width, height)
        widths = boxes[:, 2] - boxes[:, 0]
        assert float(widths.min()) > 5 and float(boxes[:, 0].min()) > -1 and float(boxes[:, 2].max()) < width + 1


PNG = b"\x89PNG\r\n\x1a\n"


def _show_files(request: pytest.FixtureRequest, family: str, tmp_path: Path, seed: int) -> tuple[Path, Path, Path]:
    """(the family's checkpoint, a 500 x 380 textured image written to disk, the figure to write)."""
    from vllm_promprune.testing.synthetic import textured_image

    image_path = tmp_path / "image.png"
    textured_image(seed, 500, 380).save(image_path)
    return request.getfixturevalue(FAMILIES[family]), image_path, tmp_path / "figure.png"


@pytest.mark.parametrize("family", ["llava-next", "qwen3-vl"])
def test_show_draws_every_method_and_promprune_stages(family: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from vllm_promprune.reference import load_reference
    from vllm_promprune.tools.show import image_tokens, select

    model, image_path, out = _show_files(request, family, tmp_path, seed=3)
    main(["show", str(image_path), "--model", str(model), "--keep", "24", "--methods", "promprune,divprune,uniform",
          "--out", str(out)])
    assert out.read_bytes()[:8] == PNG
    with Image.open(out) as figure:
        assert figure.size[0] > 1000  # five panels: image, saliency, three methods
    printed = capsys.readouterr().out
    assert "promprune: Hn" in printed and "divprune: 24 kept" in printed and f"wrote {out}" in printed

    reference = load_reference(model)
    tokens = image_tokens(reference, Image.open(image_path).convert("RGB"))
    for options in ({"mu": 1.0}, {"mu": 0.0}, {}):
        selection = select(tokens, "promprune", 24, options)
        k_sal = selection.stage.count("saliency")
        assert selection.stage == ["saliency"] * k_sal + ["coverage"] * (24 - k_sal)
        # Stage 1 = the K_sal most salient tokens (methods.md: the reference's topk), drawn in its own colour.
        most_salient = torch.topk(tokens.tower.saliency[0].float(), k_sal, largest=True, sorted=False).indices
        assert set(selection.kept[:k_sal].tolist()) == set(most_salient.tolist())
        assert len(set(selection.kept.tolist())) == 24
        if options == {"mu": 1.0}:
            assert k_sal == 24
        if options == {"mu": 0.0}:
            assert k_sal == 0


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_show_draws_what_cdpruner_keeps_for_the_question(family: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from vllm_promprune.reference import load_reference
    from vllm_promprune.tools.show import image_tokens, question_embeddings, select

    model, image_path, out = _show_files(request, family, tmp_path, seed=5)
    question = "What colour is the car on the left?"
    main(["show", str(image_path), "--model", str(model), "--keep", "20", "--methods", "cdpruner,uniform",
          "--prompt", question, "--out", str(out)])
    assert out.read_bytes()[:8] == PNG
    assert "cdpruner: 20 kept" in capsys.readouterr().out

    reference = load_reference(model)
    tokens = image_tokens(reference, Image.open(image_path).convert("RGB"))
    kept = [set(select(tokens, "cdpruner", 20, instruction=question_embeddings(reference, text)).kept.tolist())
            for text in (question, "Read the text on the sign.")]
    assert len(kept[0]) == len(kept[1]) == 20 and kept[0] != kept[1]
    with pytest.raises(SystemExit, match="cdpruner selects by the question: give --prompt"):
        main(["show", str(image_path), "--model", str(model), "--methods", "cdpruner", "--out", str(tmp_path / "b.png")])


def test_show_refuses_what_it_cannot_draw(tiny_qwen3_vl: Path, tiny_llava: Path, tmp_path: Path) -> None:
    from vllm_promprune.testing.synthetic import scene_image

    image_path = tmp_path / "image.png"
    scene_image(0, 320, 320).save(image_path)
    with pytest.raises(SystemExit, match="visionzip merges tokens"):
        main(["show", str(image_path), "--model", str(tiny_llava), "--methods", "visionzip", "--out", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit, match=r"promprune\.method 'prunesid' needs"):
        main(["show", str(image_path), "--model", str(tiny_qwen3_vl), "--keep", "8", "--methods", "prunesid",
              "--out", str(tmp_path / "b.png")])
    with pytest.raises(SystemExit, match="--keep must be between 1 and 99"):
        main(["show", str(image_path), "--model", str(tiny_qwen3_vl), "--keep", "100", "--out", str(tmp_path / "c.png")])
    assert sorted(tmp_path.glob("*.png")) == [image_path]  # nothing written for a refused request
