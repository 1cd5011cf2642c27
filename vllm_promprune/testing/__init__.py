"""Fixtures shipped for tests, demos and benchmarks: offline checkpoints with
real architectures and seeded random weights (`checkpoints`), generated images
(`synthetic`), and per-step transcriptions of every method from methods.md
(`stepwise`) that the fast implementations are audited against."""
