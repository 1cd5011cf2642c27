"""Everything that runs inside vLLM: the plugin entry point (`plugin`), the
pruned models per family and their shared template (`models/`), the one
version-guarded patch (`patches/`), request settings on the server
(`routes`, `middleware`), Prometheus metrics, the offline `PromPruneLLM`, and
the torchvision import hook for CPU-only wheels.

Kept import-light: the `.pth` hook imports `engine.torchvision_compat` in every
Python process, so nothing here may import vLLM at package level.
"""

SUPPORTED_VLLM = "0.32."
"""The vLLM release line the plugin and its patch are written against (version prefix)."""
