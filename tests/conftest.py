import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test with the working directory in tmp_path (runs/ land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
