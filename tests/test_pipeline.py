"""The pipeline's configuration, calibration lookup, re-thresholding and error policy, against
hand-made oracles (no trained model runs here)."""
import numpy as np
import pytest

from digit_demo.calibration import measured_key, threshold_for
from digit_demo.evaluation import Metrics
from digit_demo.inference import has_amx
from digit_demo.pipeline import Pipeline, PipelineConfig, Reading, Readings, Stages
from digit_demo.types import Detections

from .conftest import FIXTURES


def rows(best_at: float) -> list[Metrics]:
    """A sweep whose accuracy peaks at ``best_at``."""
    return [Metrics(t, 0.4, 0.8, 0.3, 0.9 - abs(t - best_at)) for t in (0.05, 0.3, 0.35, 0.5, 0.9)]


def test_config_turns_off_the_stages_that_need_a_missing_one_and_names_itself():
    assert PipelineConfig().key == "resnet18_fpn"
    assert PipelineConfig(proposer=None).key == "resnet18_fpn (no proposer)"
    c = PipelineConfig(number_reader=None)
    assert c.proposer is None and c.key == "resnet18_fpn (no number reader)"
    c = PipelineConfig(digit_reader=None)
    assert c.number_reader is None and c.proposer is None and c.key == "resnet18_fpn (detector only)"
    c = PipelineConfig(("a", "checkpoints/b.safetensors"), "vote", multi_scale=True)
    assert c.names == ("a", "b") and c.key == "ensemble[vote](a+b) (multi-scale)"
    assert PipelineConfig("resnet34_fpn").models == ("resnet34_fpn",)
    assert PipelineConfig(precision="fp32").key == ("resnet18_fpn (fp32)" if has_amx() else "resnet18_fpn")
    assert PipelineConfig(precision="auto").precision in ("fp32", "bf16")
    for bad in ({"fusion": "mean"}, {"threshold": 1.5}, {"precision": "half"}):
        with pytest.raises(ValueError):
            PipelineConfig(**bad)
    with pytest.raises(Exception):
        PipelineConfig().fusion = "nms"  # frozen: one config, one key


def test_calibration_finds_each_configurations_own_sweep():
    curves = {"m": rows(0.35), "m (no number reader)": rows(0.3), "m (multi-scale)": rows(0.5),
              "ensemble[vote](m+n)": rows(0.05)}
    assert threshold_for(PipelineConfig(("m",)), curves) == 0.35
    assert threshold_for(PipelineConfig(("m",), number_reader=None), curves) == 0.3  # not the full pipeline's 0.35
    assert threshold_for(PipelineConfig(("m",), multi_scale=True), curves) == 0.5
    # members named in any order; an unmeasured two-size reading falls back to the one-size sweep
    assert measured_key(PipelineConfig(("n", "m"), "vote"), curves) == "ensemble[vote](m+n)"
    assert measured_key(PipelineConfig(("n", "m"), "vote", multi_scale=True), curves) == "ensemble[vote](m+n)"
    assert measured_key(PipelineConfig(("m",), precision="fp32"), curves) == "m"  # the default precision's
    assert measured_key(PipelineConfig(("m",), proposer=None), curves) is None
    assert threshold_for(PipelineConfig(("n", "m"), "nms"), curves) == 0.5  # nothing measured: 0.5


def two_digits() -> Detections:
    return Detections(np.array([[10, 10, 40, 90], [50, 12, 80, 92]], np.float32), np.array([0.9, 0.4], np.float32),
                      np.array([4, 9]))


def test_readings_are_rethresholded_without_a_model():
    readings = Readings([Reading.of("1108.png", two_digits()), Reading("x.png", error="x.png: not a readable image")], 0.3)
    assert [n.text for n in readings.at()] == ["49", ""]  # the pipeline's threshold by default
    assert [n.text for n in readings.at(0.5)] == ["4", ""]
    assert readings.errors == ["x.png: not a readable image"] and readings[1].regions == []
    assert len(readings[0].kept(0.5)) == 1 and len(readings[1].kept(0.5)) == 0
    assert readings[1].number(0.1).label == -1


class Member:
    """A detect stage that fails on images wider than 100 px, as an unforeseen error would."""

    name, meta, reader = "m", {"threshold": 0.5}, None

    def detect_tensors(self, tensors):
        if any(t.shape[2] > 100 for t in tensors):
            raise RuntimeError("Input and output sizes should be greater than 0")
        return [two_digits() for _ in tensors]


def test_one_failing_image_is_reported_and_the_rest_of_its_batch_is_read():
    from PIL import Image

    # the real pipeline logic around a stand-in detect stage
    pipe = Pipeline(PipelineConfig(("m",), batch_size=4, threshold=0.3), stages=Stages([Member()]))
    images = [Image.new("RGB", (60, 40)), Image.new("RGB", (300, 40)), b"not an image", Image.new("RGB", (50, 50))]
    readings = pipe.read(images, ["a.png", "wide.png", "junk.png", "b.png"])
    assert [r.name for r in readings] == ["a.png", "wide.png", "junk.png", "b.png"]
    assert [n.text for n in readings.at()] == ["49", "", "", "49"]
    assert readings[1].error.startswith("wide.png: could not be read (RuntimeError: Input and output sizes")
    assert readings[2].error.startswith("junk.png: not a readable image")
    assert readings[0].image is not None and readings[1].image is None  # nothing to draw for a failure


def test_the_readings_of_fixture_photos_need_no_images_kept():
    from PIL import Image

    pipe = Pipeline(PipelineConfig(("m",), threshold=0.3), stages=Stages([Member()]))
    paths = sorted((FIXTURES / "valid").glob("*.png"))[:2]
    found = list(pipe.read_iter(paths))
    assert [r.name for r in found] == [p.name for p in paths]
    assert all(r.image is None for r in found)  # a batch of thousands keeps only detections
    for r, p in zip(found, paths):  # wider than 100 px: the stand-in fails, and the reading has no region
        if Image.open(p).width > 100:
            assert r.error and r.regions == []
        else:  # read whole: one region, the image
            assert len(r.regions) == 1 and r.regions[0].raw is not None and r.regions[0].crop == (0, 0, *Image.open(p).size)


def test_digit_demo_threads_sets_every_pipelines_threads_unless_given_explicitly():
    import subprocess
    import sys

    from .conftest import ROOT

    code = ("import torch; from digit_demo.pipeline import Pipeline, PipelineConfig, Stages;"
            "torch.set_num_threads(2); Pipeline(PipelineConfig(threshold=0.5), stages=Stages([]));"
            "a = torch.get_num_threads();"
            "from digit_demo.detect import set_threads; set_threads(2);"
            "Pipeline(PipelineConfig(threshold=0.5), stages=Stages([])); print(a, torch.get_num_threads())")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "DIGIT_DEMO_THREADS": "1"})
    assert r.stdout.split() == ["1", "2"], r.stderr  # the variable, then an explicit --threads over it
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "DIGIT_DEMO_THREADS": "two"})
    assert r.returncode != 0 and "DIGIT_DEMO_THREADS='two' is not a positive whole number" in r.stderr
