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


def build_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE tokenizer trained on a seeded synthetic corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(seed), trainer=trainer)
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


def build_llava(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write an offline LLaVA-1.5-geometry checkpoint to `out` and return it."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    geometry = LLAVA_SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(geometry.vocab_size, seed)
    tokenizer.chat_template = LLAVA_1_5_CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_1_5_CHAT_TEMPLATE,
    )
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
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
        tie_word_embeddings=False,
    )
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    _fix_clip_tower_keys(out)
    processor.save_pretrained(out)
    (out / "promprune_build.json").write_text(
        json.dumps({"family": "llava", "size": size, "seed": seed}, indent=2) + "\n"
    )
    return out


BUILDERS = {"llava": build_llava}
