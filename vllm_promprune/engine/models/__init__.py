"""vLLM model classes with visual-token pruning, one module per model family."""
