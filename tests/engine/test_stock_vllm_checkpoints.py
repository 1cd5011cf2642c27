"""The offline LLaVA-NeXT and Qwen-VL (2, 2.5, 3) checkpoints load and run in stock vLLM.

Their prompts expand exactly as the transformers processor expands them, for a
square, a wide and a tall image (LLaVA-NeXT: different AnyRes grids).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_promprune.testing.synthetic import scene_image

from .conftest import serving

CASES = {
    "llava-next": ("USER: <image>\nhi ASSISTANT:", [(672, 672), (1008, 336), (336, 1008)]),
    "qwen2.5-vl": (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n",
        [(448, 448), (672, 224), (224, 672)],
    ),
}
CASES["qwen2-vl"] = CASES["qwen2.5-vl"]
CASES["qwen3-vl"] = (CASES["qwen2.5-vl"][0], [(512, 512), (768, 256), (256, 768)])  # patch 16
# Qwen3-VL-MoE has Qwen3-VL's processor and tower; stock vLLM runs its checkpoint in
# test_engine_qwen.py (keep-all is bit-identical to it; its prompts have the grid's N tokens).


@pytest.mark.parametrize("family", sorted(CASES))
def test_stock_vllm_expands_prompts_like_transformers(family: str, tmp_path: Path) -> None:
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from vllm_promprune.testing.checkpoints import BUILDERS

    out = BUILDERS[family](tmp_path / family, size="tiny", seed=0)
    prompt, sizes = CASES[family]
    processor = AutoProcessor.from_pretrained(out)
    engine = LLM(str(out), enforce_eager=True, dtype="float32", max_model_len=4096, seed=0,
                 limit_mm_per_prompt={"image": 1, "video": 0})
    with serving(engine) as llm:
        for width, height in sizes:
            image = scene_image(0, width, height)
            expected = processor(images=[image], text=prompt, return_tensors="pt")["input_ids"][0].tolist()
            output = llm.generate(
                {"prompt": prompt, "multi_modal_data": {"image": image}},
                SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False,
            )[0]
            assert list(output.prompt_token_ids) == expected, (width, height)
            assert len(output.outputs[0].token_ids) == 2
