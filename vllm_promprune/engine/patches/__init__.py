"""Small, version-guarded patches of vLLM internals (applied by the plugin)."""
