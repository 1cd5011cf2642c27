"""Precomputed image embeddings (`enable_mm_embeds`) cannot be pruned: a budget on them is
refused in the processor, naming the field, for plain tensors (LLaVA) and for Qwen's
dict inputs (`image_embeds` + `image_grid_thw`) alike; opted out, they are served as
stock vLLM serves them, and the engine keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from .conftest import image_request, offline_engine, run

LLAVA_PROMPT = "USER: <image>\nWhat is shown? ASSISTANT:"
QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n<|im_start|>assistant\n"
REFUSED = r"promprune\.keep: pruning needs image pixels"


def _llava_embeds(hidden: int) -> object:
    return torch.randn(1, 576, hidden, generator=torch.Generator().manual_seed(0))  # one 336 px image's tokens


def _qwen_embeds(hidden: int) -> object:
    # A 224 x 224 image: 16 x 16 patches of 14 px, 8 x 8 merged tokens.
    rows = torch.randn(64, hidden, generator=torch.Generator().manual_seed(0))
    return {"image_embeds": rows, "image_grid_thw": torch.tensor([[1, 16, 16]])}


FAMILIES: dict[str, tuple[str, str, Callable[[int], object], int]] = {
    "llava": ("tiny_llava", LLAVA_PROMPT, _llava_embeds, 336),
    "qwen2.5-vl": ("tiny_qwen2_5_vl", QWEN_PROMPT, _qwen_embeds, 224),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_budgets_on_image_embeddings_are_refused(family: str, request: pytest.FixtureRequest) -> None:
    fixture, prompt, embeds, side = FAMILIES[family]
    model: Path = request.getfixturevalue(fixture)
    engine_args = {"enforce_eager": True, "dtype": "float32", "max_model_len": 2048, "seed": 0,
                   "enable_mm_embeds": True, "limit_mm_per_prompt": {"image": 1, "video": 0},
                   "default_settings": {"keep": 16}}
    with offline_engine(model, engine_args, pruned=True) as llm:
        embedded = image_request(prompt, [embeds(llm.llm_engine.model_config.hf_text_config.hidden_size)])
        pixels = Image.new("RGB", (side, side), (120, 60, 200))
        for settings in (None, {"keep": 8}, {"keep": 8, "method": "uniform"}):  # server default, then per request
            request_settings = embedded if settings is None else {**embedded, "mm_processor_kwargs": {"promprune": settings}}
            with pytest.raises(ValueError, match=REFUSED):
                run(llm, [request_settings], max_tokens=4)
        opted_out = {**embedded, "mm_processor_kwargs": {"promprune": {"keep": None}}}
        (embedded_ids, embedded_tokens), = run(llm, [opted_out], max_tokens=4)
        (stock_ids, _), = run(llm, [image_request(prompt, [pixels], {"keep": None})], max_tokens=4)
        (pruned_ids, pruned_tokens), = run(llm, [image_request(prompt, [pixels])], max_tokens=4)
    assert len(embedded_ids) == len(stock_ids)  # every embedding row has its placeholder
    assert len(embedded_tokens) == len(pruned_tokens) == 4
    assert len(pruned_ids) == len(stock_ids) - (576 if family == "llava" else 64) + 16  # the default still prunes
