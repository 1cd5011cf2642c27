"""Operator tools behind the `vllm-promprune` command: the CLI, the selection
and serving benchmarks, the demo, and a managed server subprocess."""
