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
def default_pipeline():
    """The shipped default pipeline (real, trained models)."""
    from digit_demo.pipeline import Pipeline

    return Pipeline()


def raw_detections(config=None, paths=()) -> list:
    """The raw detections a pipeline of ``config`` (default: the shipped default) finds in crops
    ``paths``, each read whole (one region: no locate stage)."""
    from dataclasses import replace

    from digit_demo.pipeline import Pipeline, PipelineConfig

    return raw_of(Pipeline(replace(config or PipelineConfig(), locator=None)).read(paths))


def raw_of(readings) -> list:
    """Each crop's raw detections (a crop is read whole: its one region's), None where it was not read."""
    return [r.regions[0].raw if r.regions else None for r in readings]


def measured_threshold(*keys: str) -> float:
    """The best threshold of a configuration, read straight from the shipped sweeps (the first of
    ``keys`` measured)."""
    import json

    from digit_demo.evaluation import Metrics, best

    sweeps = json.loads((ROOT / "checkpoints" / "sweeps.json").read_text())
    return best([Metrics(**r) for r in sweeps[next(k for k in keys if k in sweeps)]]).threshold
