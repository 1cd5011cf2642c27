"""Per-family geometry, pure torch (no vLLM import): which tokens an image
becomes and where they sit.

- `anyres`: LLaVA-NeXT's multi-crop (AnyRes) layout, its budget modes and the
  newline column.
- `qwen_vision`: Qwen2.5-VL's merged-token saliency, merger inputs, M-RoPE
  positions and the offsets a kept token carries.
"""
