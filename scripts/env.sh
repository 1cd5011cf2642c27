# Environment for running vLLM on this project's CPU machines (sourced by the scripts).
# The same defaults as vllm_promprune/tools/cpu_defaults.py, which `vllm-promprune serve`
# applies by itself on vLLM's CPU backend (a unit test keeps the two in agreement).
# Like there, a value already set is kept.
# KV cache size must be set on CPU: the sandbox's NUMA node reports ~8.5 GiB.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.scratch/vllm-cache}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
