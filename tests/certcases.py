"""Load the checked-in test-certificate builder (certs/testcases.py) for tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_testcases() -> ModuleType:
    """The certs/testcases.py module."""
    spec = importlib.util.spec_from_file_location("psn_testcases", ROOT / "certs" / "testcases.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
