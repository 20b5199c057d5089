import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixture_gt() -> dict:
    from digit_demo.data import load_coco

    return load_coco(FIXTURES / "valid.json")


@pytest.fixture(scope="session")
def fixture_images() -> Path:
    return FIXTURES / "valid"


@pytest.fixture(scope="session")
def default_detector():
    """The shipped default checkpoint (a real, trained model)."""
    from digit_demo.detect import Detector

    return Detector.load()
