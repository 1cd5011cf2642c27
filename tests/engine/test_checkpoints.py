"""Offline checkpoints: deterministic, complete, real LLaVA-1.5 geometry."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from vllm_promprune.testing.checkpoints import build_llava


def _digest(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


def test_same_seed_same_files_other_seed_other_weights(tiny_llava: Path, tmp_path: Path) -> None:
    again = build_llava(tmp_path / "again", size="tiny", seed=0)
    other = build_llava(tmp_path / "other", size="tiny", seed=1)
    assert _digest(again) == _digest(tiny_llava)
    assert _digest(other)["model.safetensors"] != _digest(tiny_llava)["model.safetensors"]


def test_loads_in_transformers_with_no_missing_keys(tiny_llava: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(tiny_llava, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(tiny_llava)
    assert model.config.vision_feature_layer == -2
    assert (model.config.vision_config.image_size, model.config.vision_config.patch_size) == (336, 14)

    from vllm_promprune.testing.synthetic import scene_image

    inputs = processor(images=[scene_image(0)], text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    image_token = model.config.image_token_index
    assert int((inputs["input_ids"] == image_token).sum()) == 576
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_chat_template_is_llava_1_5(tiny_llava: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<s>USER: <image>\nWhat is it? ASSISTANT:"


def test_llava_next_checkpoint_has_anyres_geometry(tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from vllm_promprune.testing.checkpoints import build_llava_next
    from vllm_promprune.testing.synthetic import scene_image

    out = build_llava_next(tmp_path / "llava-next", size="tiny", seed=0)
    model, info = LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=[scene_image(0, 672, 672)], text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 5, 3, 336, 336)  # base view + 4 crops
    # 5 x 576 patch tokens after unpadding/pooling to the grid, plus one newline per row
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 2928


def test_qwen2_5_vl_checkpoint_has_real_geometry(tmp_path: Path) -> None:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vllm_promprune.testing.checkpoints import build_qwen2_5_vl
    from vllm_promprune.testing.synthetic import scene_image

    out = build_qwen2_5_vl(tmp_path / "qwen", size="tiny", seed=0)
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    text_config, vision_config = model.config.text_config, model.config.vision_config
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    assert sum(text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert list(vision_config.fullatt_block_indexes) == [1, 3]
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[scene_image(0, 448, 448)], text=text, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]  # 448 / 14 patches per side
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 32 * 32 // 4  # 2x2 merge


def test_qwen2_vl_checkpoint_has_real_geometry(tiny_qwen2_vl: Path) -> None:
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vllm_promprune.testing.synthetic import scene_image

    model, info = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2_vl, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    text_config, vision_config = model.config.text_config, model.config.vision_config
    assert sum(text_config.rope_parameters["mrope_section"]) == text_config.hidden_size // text_config.num_attention_heads // 2
    assert vision_config.hidden_size == text_config.hidden_size  # Qwen2-VL: the merger's output width
    assert vision_config.hidden_act == "quick_gelu"  # what vLLM's Qwen2-VL tower hard-codes
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    inputs = processor(images=[scene_image(0, 448, 448)], text="<|vision_start|><|image_pad|><|vision_end|>", return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 32 * 32 // 4


@pytest.mark.parametrize("fixture", ["tiny_qwen3_vl", "tiny_qwen3_vl_moe"])
def test_qwen3_vl_checkpoints_have_real_geometry(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    import transformers
    from safetensors.torch import load_file

    from vllm_promprune.testing.checkpoints import BUILDERS
    from vllm_promprune.testing.synthetic import scene_image

    out = request.getfixturevalue(fixture)
    family = fixture.removeprefix("tiny_").replace("_", "-")
    assert _digest(BUILDERS[family](tmp_path / "again", size="tiny", seed=0)) == _digest(out)
    config = transformers.AutoConfig.from_pretrained(out)
    model, info = getattr(transformers, config.architectures[0]).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    text_config, vision_config = model.config.text_config, model.config.vision_config
    assert text_config.rope_parameters["mrope_interleaved"] is True
    assert sum(text_config.rope_parameters["mrope_section"]) == text_config.head_dim // 2
    assert vision_config.patch_size == 16 and vision_config.out_hidden_size == text_config.hidden_size
    assert list(vision_config.deepstack_visual_indexes) == [1, 2]  # <= the LLM's 2 layers they feed
    assert len(model.model.visual.deepstack_merger_list) == 2
    if family == "qwen3-vl-moe":
        weights = load_file(str(out / "model.safetensors"))
        experts, hidden, intermediate = text_config.num_experts, text_config.hidden_size, text_config.moe_intermediate_size
        # The hub layout vLLM's loader transposes, and which transformers reads back exactly.
        assert weights["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (experts, hidden, 2 * intermediate)
        assert weights["model.language_model.layers.0.mlp.experts.down_proj"].shape == (experts, intermediate, hidden)
        assert 2 * intermediate != hidden and text_config.norm_topk_prob and not text_config.tie_word_embeddings
        loaded = model.model.language_model.layers[0].mlp.experts.gate_up_proj
        assert torch.equal(loaded, weights["model.language_model.layers.0.mlp.experts.gate_up_proj"].transpose(1, 2))
    processor = transformers.AutoProcessor.from_pretrained(out)
    inputs = processor(images=[scene_image(0, 512, 512)], text="<|vision_start|><|image_pad|><|vision_end|>", return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]  # 512 / 16 patches per side
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 32 * 32 // 4
