import os
from pathlib import Path

import pytest

# No model or dataset may come from the Hub in tests; loading code runs on local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
HH_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-test-1500.jsonl.gz"


@pytest.fixture
def hh_data() -> Path:
    if not HH_DATA.exists():
        pytest.fail(f"{HH_DATA} is missing: the tests need ../shared/data beside the project (CI has it)")
    return HH_DATA


@pytest.fixture
def write_pipeline(tmp_path):
    """Write a pipeline YAML into tmp_path and return its path."""
    def write(text: str, name: str = "pipeline.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write
