"""Offline checkpoints with real architectures and random, seeded weights.

No model hub is reachable where the tests and demos run, so they use
checkpoints built here: the real transformers classes and processors, a
tokenizer trained locally with `tokenizers`, the model's chat template, and
weights drawn from a seeded generator. They load through the same
`from_pretrained` / `vllm serve DIR` paths as real checkpoints.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
# Qwen2.5-VL's ChatML format with a default system turn; images and videos become
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad token).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5 conversation format: "USER: <image>\n{question} ASSISTANT:".
# Starts with bos_token because vLLM's OpenAI endpoint tokenizes the rendered
# template without adding special tokens.
LLAVA_1_5_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in parts if part['type'] == 'text' %}{{ part['text'] }} {% endfor %}"
    "{% else %}"
    "{{ message['role'] | upper }}: "
    "{% for part in parts if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in parts if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class LlavaSize:
    """Geometry of an offline LLaVA-1.5 checkpoint (the ViT is always 336 px / patch 14)."""

    vocab_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int


LLAVA_SIZES: dict[str, LlavaSize] = {
    # Tests: fast to build, load and run; head_dim 32 is a CPU attention size.
    "tiny": LlavaSize(1024, 128, 2, 4, 256, 64, 3, 4, 128),
    # Benchmarks: ~69M-parameter LM (head_dim 64), ~3M-parameter ViT, so prefill
    # dominates the way it does for LLaVA-1.5-7B.
    "small": LlavaSize(8192, 768, 8, 12, 2048, 256, 4, 4, 1024),
}

_CORPUS_WORDS = (
    "a an the this that these those image picture photo scene object person people "
    "dog cat car tree house sky water road street building window door table chair "
    "red green blue yellow black white gray brown orange purple left right top bottom "
    "center middle near far small large big tiny many few one two three four five "
    "is are was were has have what where which who how why when describe show tell "
    "color shape size count number there here in on at of with and or not to from "
    "user assistant question answer yes no please thank you can see look visible"
).split()


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(4, 16)))
        + rng.choice([".", "?", "!", ","])
        for _ in range(lines)
    ]


def _train_bpe(vocab_size: int, seed: int, special_tokens: list[str]):  # noqa: ANN202
    """A byte-level BPE `tokenizers.Tokenizer` trained on a seeded synthetic corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(seed), trainer=trainer)
    return core


def build_tokenizer(vocab_size: int, seed: int):  # noqa: ANN201
    """LLaVA's tokenizer layout: <s>/</s>/<unk>/<pad>, <image>, BOS added on encode."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    core = _train_bpe(vocab_size, seed, list(SPECIAL_TOKENS))
    # Like LLaVA's Llama tokenizer: BOS is added when add_special_tokens=True.
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )


def build_qwen_tokenizer(vocab_size: int, seed: int):  # noqa: ANN201
    """Qwen2.5-VL's tokenizer layout: ChatML and vision special tokens, no BOS."""
    from transformers import PreTrainedTokenizerFast

    core = _train_bpe(vocab_size, seed, list(QWEN_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        model_max_length=32768,
    )


def _fix_clip_tower_keys(out: Path) -> None:
    """Restore the `vision_model.` key level vLLM expects inside the CLIP tower.

    transformers 5.x saves `vision_tower.embeddings...`; released LLaVA
    checkpoints (and vLLM's loader) use `vision_tower.vision_model.embeddings...`.
    """
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    fixed = {}
    for key, value in tensors.items():
        head, sep, rest = key.partition("vision_tower.")
        if sep and head in ("", "model.") and not rest.startswith("vision_model."):
            key = f"{head}vision_tower.vision_model.{rest}"
        fixed[key] = value.contiguous()
    save_file(fixed, str(path), metadata={"format": "pt"})


_CLIP_IMAGE = dict(
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    do_center_crop=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)
# llava-v1.6's AnyRes grid: a 672x672 image is the 336-px base view plus 4 crops.
ANYRES_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _clip_llama_parts(size: str, seed: int):  # noqa: ANN202 (transformers types)
    """Tokenizer, CLIP-336/14 vision config and Llama text config for one size."""
    from transformers import CLIPVisionConfig, LlamaConfig

    geometry = LLAVA_SIZES[size]
    tokenizer = build_tokenizer(geometry.vocab_size, seed)
    tokenizer.chat_template = LLAVA_1_5_CHAT_TEMPLATE
    vision = CLIPVisionConfig(
        hidden_size=geometry.vision_hidden,
        intermediate_size=geometry.vision_intermediate,
        num_hidden_layers=geometry.vision_layers,
        num_attention_heads=geometry.vision_heads,
        image_size=336,
        patch_size=14,
        projection_dim=geometry.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=geometry.text_hidden,
        intermediate_size=geometry.text_intermediate,
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=geometry.text_heads,
        num_key_value_heads=geometry.text_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return tokenizer, vision, text


def _llava_processor_args(tokenizer) -> dict:  # noqa: ANN001
    return dict(
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_1_5_CHAT_TEMPLATE,
    )


def _llava_config_args(tokenizer, vision, text) -> dict:  # noqa: ANN001
    return dict(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
        tie_word_embeddings=False,
    )


def _save(model_class, config, processor, out: Path, family: str, size: str, seed: int) -> Path:  # noqa: ANN001
    """Seeded random weights in float32, keys in vLLM's layout, processor, build record."""
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    _fix_clip_tower_keys(out)
    processor.save_pretrained(out)
    (out / "promprune_build.json").write_text(
        json.dumps({"family": family, "size": size, "seed": seed}, indent=2) + "\n"
    )
    return out


def build_llava(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write an offline LLaVA-1.5-geometry checkpoint to `out` and return it."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer, vision, text = _clip_llama_parts(size, seed)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(**_CLIP_IMAGE), **_llava_processor_args(tokenizer))
    config = LlavaConfig(**_llava_config_args(tokenizer, vision, text))
    return _save(LlavaForConditionalGeneration, config, processor, out, "llava", size, seed)


def build_llava_next(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write an offline LLaVA-NeXT (llava-v1.6 AnyRes) checkpoint to `out` and return it."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer, vision, text = _clip_llama_parts(size, seed)
    image_processor = LlavaNextImageProcessor(image_grid_pinpoints=ANYRES_PINPOINTS, **_CLIP_IMAGE)
    processor = LlavaNextProcessor(image_processor=image_processor, **_llava_processor_args(tokenizer))
    config = LlavaNextConfig(image_grid_pinpoints=ANYRES_PINPOINTS, **_llava_config_args(tokenizer, vision, text))
    return _save(LlavaNextForConditionalGeneration, config, processor, out, "llava-next", size, seed)


@dataclass(frozen=True)
class QwenSize:
    """Geometry of an offline Qwen2.5-VL checkpoint (ViT patch 14, 2x2 merge, temporal patch 2)."""

    vocab_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    fullatt_block_indexes: tuple[int, ...]


QWEN_SIZES: dict[str, QwenSize] = {
    "tiny": QwenSize(1024, 128, 2, 4, 2, 256, (4, 6, 6), 64, 4, 4, 128, (1, 3)),
    "small": QwenSize(8192, 768, 8, 12, 4, 2048, (8, 12, 12), 256, 8, 4, 512, (3, 7)),
}


def _qwen_processor_and_text(
    processor_class: type, size: str, seed: int, *, patch_size: int = 14, video_processor_class: type | None = None
) -> tuple[object, dict[str, object], dict[str, int]]:
    """The Qwen-family processor (its real image and video processors, a ChatML
    tokenizer with Qwen's vision tokens), the text config and the special token ids.

    `patch_size`: the ViT patch (14 for Qwen2/2.5-VL, 16 for Qwen3-VL); the pixel limits
    scale with it so every family gets at most 640 merged tokens per image.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    geometry = QWEN_SIZES[size]
    tokenizer = build_qwen_tokenizer(geometry.vocab_size, seed)
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    merged_pixels = (2 * patch_size) ** 2  # one merged token: 2 x 2 patches
    pixel_limits = dict(min_pixels=4 * merged_pixels, max_pixels=640 * merged_pixels)
    video_processor_class = video_processor_class or Qwen2VLVideoProcessor
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(patch_size=patch_size, **pixel_limits),
        video_processor=video_processor_class(patch_size=patch_size, **pixel_limits),
        tokenizer=tokenizer,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    special = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    )}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=geometry.text_hidden,
        intermediate_size=geometry.text_intermediate,
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=geometry.text_heads,
        num_key_value_heads=geometry.text_kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": list(geometry.mrope_section)},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return processor, text, special


def build_qwen2_5_vl(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write an offline Qwen2.5-VL checkpoint (window attention, M-RoPE) to `out`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    geometry = QWEN_SIZES[size]
    processor, text, special = _qwen_processor_and_text(Qwen2_5_VLProcessor, size, seed)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=geometry.vision_depth,
            hidden_size=geometry.vision_hidden,
            intermediate_size=geometry.vision_intermediate,
            num_heads=geometry.vision_heads,
            out_hidden_size=geometry.text_hidden,
            fullatt_block_indexes=list(geometry.fullatt_block_indexes),
        ),
        tie_word_embeddings=False,
        **special,
    )
    return _save(Qwen2_5_VLForConditionalGeneration, config, processor, out, "qwen2.5-vl", size, seed)


def build_qwen2_vl(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write an offline Qwen2-VL checkpoint (full attention in every vision block, M-RoPE) to `out`.

    Qwen2-VL's vision config names the ViT width `embed_dim` and the LLM width
    `hidden_size`; its MLP is QuickGELU (vLLM hard-codes it), width embed_dim * mlp_ratio.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    geometry = QWEN_SIZES[size]
    processor, text, special = _qwen_processor_and_text(Qwen2VLProcessor, size, seed)
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=geometry.vision_depth,
            embed_dim=geometry.vision_hidden,
            hidden_size=geometry.text_hidden,
            num_heads=geometry.vision_heads,
            mlp_ratio=geometry.vision_intermediate // geometry.vision_hidden,
        ),
        tie_word_embeddings=False,
        **special,
    )
    return _save(Qwen2VLForConditionalGeneration, config, processor, out, "qwen2-vl", size, seed)


def build_qwen3_vl(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write an offline Qwen3-VL checkpoint to `out`: ViT patch 16 with a learned position
    grid, full attention in every block, deepstack mergers feeding the first LLM layers,
    interleaved M-RoPE, Qwen3's text layers (q/k norms, explicit head_dim)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor, text, special = _qwen3_vl_parts(size, seed)
    config = Qwen3VLConfig(text_config=text, vision_config=_qwen3_vision_config(size), tie_word_embeddings=False, **special)
    return _save(Qwen3VLForConditionalGeneration, config, processor, out, "qwen3-vl", size, seed)


def build_qwen3_vl_moe(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write an offline Qwen3-VL-MoE checkpoint to `out`: Qwen3-VL's tower, a sparse MoE
    in every LLM layer (4 experts, top 2, normalised routing weights, as Qwen3-VL-30B-A3B
    with fewer experts), expert weights fused in the hub layout."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    geometry = QWEN_SIZES[size]
    processor, text, special = _qwen3_vl_parts(size, seed)
    del text["intermediate_size"]
    # 2 * moe_intermediate != hidden: a transposed expert tensor cannot load by accident.
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=geometry.text_intermediate // 4 + 32,
                decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False)
    config = Qwen3VLMoeConfig(text_config=text, vision_config=_qwen3_vision_config(size), tie_word_embeddings=False, **special)
    _save(Qwen3VLMoeForConditionalGeneration, config, processor, out, "qwen3-vl-moe", size, seed)
    _transpose_fused_experts(out)
    return out


def _transpose_fused_experts(out: Path) -> None:
    """Store fused expert weights as the released Qwen3-VL-MoE checkpoints do.

    transformers 5.x holds `experts.gate_up_proj` as [E, 2I, H] and `down_proj` as
    [E, H, I] and saves them so; the hub layout (which transformers transposes on load
    and vLLM's loader expects) is [E, H, 2I] and [E, I, H].
    """
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    fused = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
    fixed = {key: (value.transpose(1, 2) if key.endswith(fused) else value).contiguous() for key, value in tensors.items()}
    save_file(fixed, str(path), metadata={"format": "pt"})


def _qwen3_vl_parts(size: str, seed: int) -> tuple[object, dict[str, object], dict[str, int]]:
    """Qwen3-VL's processor (patch 16, its video processor), text config and token ids."""
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    geometry = QWEN_SIZES[size]
    processor, text, special = _qwen_processor_and_text(
        Qwen3VLProcessor, size, seed, patch_size=16, video_processor_class=Qwen3VLVideoProcessor
    )
    head_dim = geometry.text_hidden // geometry.text_heads
    text["head_dim"] = head_dim
    # Interleaved sections: t takes what h and w (every third frequency) leave.
    hw = head_dim // 6
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0,
                               "mrope_section": [head_dim // 2 - 2 * hw, hw, hw], "mrope_interleaved": True}
    return processor, text, special


def _qwen3_vision_config(size: str) -> dict[str, object]:
    """Qwen3-VL's tower: up to three deepstack taps spread over the blocks like
    Qwen3-VL-8B's (8, 16, 24 of 27), one per early LLM layer they feed."""
    geometry = QWEN_SIZES[size]
    levels = min(3, geometry.text_layers, geometry.vision_depth - 2)
    step = geometry.vision_depth // (levels + 1)
    return dict(
        depth=geometry.vision_depth,
        hidden_size=geometry.vision_hidden,
        intermediate_size=geometry.vision_intermediate,
        num_heads=geometry.vision_heads,
        out_hidden_size=geometry.text_hidden,
        num_position_embeddings=16 * 16,  # a 16 x 16 learned grid, resampled to each image
        deepstack_visual_indexes=[step * (level + 1) for level in range(levels)],
    )


BUILDERS = {
    "llava": build_llava,
    "llava-next": build_llava_next,
    "qwen2.5-vl": build_qwen2_5_vl,
    "qwen2-vl": build_qwen2_vl,
    "qwen3-vl": build_qwen3_vl,
    "qwen3-vl-moe": build_qwen3_vl_moe,
}
