import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# Tests import the helpers in tests/ (launch.py) and the repo's package without an install.
sys.path.insert(0, str(TESTS))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The tiers, by folder. tests/unit starts no process (fast, one process: `-m "not distributed"`);
# every test that starts processes (launchers, torchrun, forked ranks, a real train.py, console
# scripts, a child as another user) lives in tests/distributed or tests/e2e and is marked here.
TIERS = {"distributed": ("distributed",), "e2e": ("e2e", "distributed")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            folder = Path(item.path).resolve().relative_to(TESTS.resolve()).parts[0]
        except ValueError:
            continue
        for marker in TIERS.get(folder, ()):
            item.add_marker(getattr(pytest.mark, marker))
