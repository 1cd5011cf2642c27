"""Test layout: each folder under tests/ gets its marker, so any part runs alone.

- `unit`: pure torch and request parsing, no engine (`pytest tests/unit`, under a minute);
- `audit`: pure torch, slow: every method against its per-step transcription of
  methods.md on 200+ seeded cases, and property-based search of the settings;
- `engine`: real vLLM engines and servers on the tiny offline checkpoints; those marked
  `gpu` (tests/engine/test_gpu.py) need CUDA and are skipped without it
  (`scripts/gpu-check.sh` runs them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

FOLDER_MARKERS = ("unit", "audit", "engine")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        folder = item.path.relative_to(tests_dir).parts[0]
        if folder not in FOLDER_MARKERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of tests/{{{','.join(FOLDER_MARKERS)}}}/")
        item.add_marker(folder)
