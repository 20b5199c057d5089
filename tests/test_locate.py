"""The locate stage: synthetic scenes, the shipped locator, and whole photos read through the pipeline.

The fixture scenes (``tests/fixtures/scenes``) were made by ``train.scenes`` from fixture crops on the
scene benchmark's backgrounds; ``scenes.json`` holds where each number was pasted (the oracle)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from digit_demo.checkpoints import CHECKPOINT_DIR, CheckpointError
from digit_demo.images import decode
from digit_demo.locator import (DEFAULT_LOCATOR, INPUT_SIDE, MIN_PHOTO_SIDE, LocateSettings, Locator, input_size, load_locator, reading_box, regions_from_map,
                                save_locator)
from digit_demo.pipeline import Pipeline, PipelineConfig

from .conftest import FIXTURES

SCENES = FIXTURES / "scenes"
shipped = pytest.mark.skipif(not (CHECKPOINT_DIR / "locator.safetensors").is_file(), reason="no locator shipped")


def scene_truth() -> dict:
    return json.loads((SCENES / "scenes.json").read_text())


def test_a_centre_map_decodes_to_the_region_it_marks():
    out = torch.full((5, 36, 48), -9.0)  # a 384 x 288 input: 48 x 36 cells
    out[0, 10, 20] = 5.0  # centre cell (row 10, col 20), offset (0.5, 0.25), size 6 x 2 cells
    out[1, 10, 20], out[2, 10, 20] = 0.5, 0.25
    out[3, 10, 20], out[4, 10, 20] = np.log(6), np.log(2)
    (region,) = regions_from_map(out, 2.0, 2.0, 0.5)
    cx, cy = (20.5 * 8, 10.25 * 8)
    assert np.allclose(region.box, [2 * (cx - 24), 2 * (cy - 8), 2 * (cx + 24), 2 * (cy + 8)])
    assert regions_from_map(out, 1, 1, 0.999) == []  # below the score, nothing
    assert input_size(1600, 1200) == (384, 288) and input_size(1200, 1600) == (288, 384)


def test_a_reading_crop_pads_the_region_as_svhn_crops_are_and_stays_in_the_photo():
    x1, y1, x2, y2 = reading_box(np.array([100, 200, 160, 240]), 1600, 1200)  # digits 40 px tall
    assert (x1, y1, x2, y2) == (80, 190, 180, 250)  # half a height sideways, a quarter above and below
    assert 40 / (y2 - y1) == pytest.approx(2 / 3)
    assert reading_box(np.array([-5, -5, 30, 20]), 100, 100)[:2] == (0, 0)


def test_how_regions_are_read_comes_from_the_sidecar(tmp_path):
    model = Locator(8)
    model.settings = LocateSettings(0.2, (1.0, 0.25), 0.5)
    save_locator(model, tmp_path / "loc.safetensors", {})
    loaded = load_locator(tmp_path / "loc.safetensors")
    assert loaded.settings == LocateSettings(min_score=0.2, pad=(1.0, 0.25), rank_power=0.5)
    assert reading_box(np.array([100, 200, 160, 240]), 1600, 1200, loaded.settings.pad) == (60, 190, 200, 250)
    side = tmp_path / "loc.json"  # a setting no locator has, or a value that is not a number: one clear error
    meta = json.loads(side.read_text())
    for bad, message in (({"widen": [0.3, 1.0]}, "has 'widen', which a LocateSettings does not have"),
                         ({"pad": [1.0]}, "does not hold 2 numbers"), ({"min_score": "high"}, "is not a number")):
        side.write_text(json.dumps({**meta, "tuned": {**meta["tuned"], **bad}}))
        with pytest.raises(CheckpointError, match=message):
            load_locator(tmp_path / "loc.safetensors")


def test_regions_rank_by_reading_confidence_times_locator_score_to_the_tuned_power():
    from digit_demo.pipeline import Reading, RegionReading
    from digit_demo.types import Detections, Found

    def region(score, digit, confidence, power):
        raw = Detections(np.array([[10, 10, 30, 50]], np.float32), np.array([confidence], np.float32), np.array([digit]))
        return RegionReading(np.array([0, 0, 100, 60], np.float32), score, (0, 0, 100, 60), Found(raw), rank_power=power)

    for power, first in ((0.0, "1"), (1.0, "5")):  # a sure "1" in a doubtful region against a fair "5" in a sure one
        reading = Reading("x", regions=[region(0.3, 1, 0.9, power), region(0.9, 5, 0.6, power)])
        assert reading.number(0.5).text == first


def test_scene_generation_is_seeded_and_its_boxes_are_where_the_digits_went(tmp_path):
    from train.scenes import Crop, compose

    crop_img = Image.new("RGB", (60, 30), (255, 255, 255))
    crop_img.paste((0, 0, 0), (20, 5, 40, 25))  # one black "digit" on a white plate
    crop = Crop(crop_img, np.array([[20, 5, 40, 25]], np.float32), np.array([7]))
    bg = Image.new("RGB", (800, 600), (0, 128, 0))
    a = compose([crop], bg, np.random.default_rng(3), size=(800, 600), distractors=(0, 0))
    b = compose([crop], bg, np.random.default_rng(3), size=(800, 600), distractors=(0, 0))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.regions == b.regions
    x1, y1, x2, y2 = (int(round(v)) for v in a.boxes[0][0])
    inside = np.asarray(a.image.convert("L"))[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]
    assert inside.mean() < 60  # the box holds the dark digit
    assert a.texts == ["7"] and a.regions[0] == pytest.approx([float(v) for v in a.boxes[0][0]])


def test_a_large_jpeg_is_located_from_a_reduced_decode(tmp_path, monkeypatch):
    import digit_demo.pipeline as pipeline

    photo = Image.open(SCENES / scene_truth()["images"][0]["file_name"]).resize((4000, 3000))
    path = tmp_path / "big.jpg"
    photo.save(path, quality=90)
    seen = decode(path, draft_side=INPUT_SIDE)
    assert seen.reduced and seen.size == (4000, 3000) and max(seen.image.size) < 1000  # 1/8 scale: 500 x 375
    calls = []
    real = pipeline.decode
    monkeypatch.setattr(pipeline, "decode", lambda *a, **k: calls.append(k) or real(*a, **k))
    from digit_demo.pipeline import Stages

    # an untrained locator: only where it reads from matters here
    pipe = Pipeline(PipelineConfig(threshold=0.5), stages=Stages([], locator=Locator().eval()))
    image, _ = pipe.locate(path, "big.jpg")
    assert calls == [{"draft_side": INPUT_SIDE}] and image.size == (4000, 3000)  # regions read at full size


@pytest.mark.slow
@shipped
def test_the_locator_finds_each_pasted_number_where_it_was_pasted():
    truth = scene_truth()
    pipe = Pipeline(PipelineConfig(locator=DEFAULT_LOCATOR))
    for im in truth["images"]:
        _, located = pipe.locate(SCENES / im["file_name"], im["file_name"])
        regions = truth["regions"][str(im["id"])]
        assert len(located) >= len(regions)
        iou = box_iou(torch.tensor(np.stack([r.box for r in located])), torch.tensor(regions))
        assert (iou.amax(0) >= 0.5).all(), (im["file_name"], iou)


@pytest.mark.slow
@shipped
def test_whole_photos_are_read_including_two_numbers_in_one():
    truth = scene_truth()
    pipe = Pipeline()
    paths = [SCENES / im["file_name"] for im in truth["images"]]
    readings = pipe.read(paths)
    for im, reading in zip(truth["images"], readings):
        expected = truth["texts"][str(im["id"])]
        read = sorted(n.text for _, n in reading.numbers(pipe.threshold))
        assert set(expected) <= set(read), (im["file_name"], expected, read)
        assert reading.number(pipe.threshold).text in expected  # pred.csv keeps the most confident
        kept = reading.kept(pipe.threshold)  # every digit box, in the photo's pixels, inside its regions
        for box in kept.boxes[kept.scores >= 0.5]:
            assert any(box[0] >= r.crop[0] - 1 and box[2] <= r.crop[2] + 1 for r in reading.regions)
    assert any(len(truth["texts"][str(im["id"])]) == 2 for im in truth["images"])


@pytest.mark.slow
def test_the_cnn_locator_reads_crops_whole():
    crops = sorted((FIXTURES / "valid").glob("*.png"))
    assert all(min(Image.open(p).size) < MIN_PHOTO_SIDE for p in crops)
    with_locator, without = Pipeline(PipelineConfig(locator=DEFAULT_LOCATOR)), Pipeline(PipelineConfig(locator=None))
    a, b = with_locator.read(crops), without.read(crops)
    assert all(not r.located and len(r.regions) == 1 for r in a)  # each read whole: one region, the image
    assert [n.text for n in a.at()] == [n.text for n in b.at()]


@pytest.mark.slow
@shipped
def test_predict_writes_every_region_and_keeps_the_most_confident_number(tmp_path):
    import csv
    import subprocess
    import sys

    from .conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "digit_demo", "predict", str(SCENES), "--out", str(tmp_path), "-q",
                        "--regions", str(tmp_path / "regions.jsonl")], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "regions.jsonl").read_text().splitlines()]
    assert [Path(x["file"]).name for x in lines] == ["scene1.jpg", "scene2.jpg", "scene3.jpg"]
    with open(tmp_path / "pred.csv") as f:
        labels = {int(row["image_id"]): int(row["pred_label"]) for row in csv.DictReader(f)}
    for k, line in enumerate(lines, 1):
        numbers = line["numbers"]
        assert all(n["region"] is not None and len(n["digits"]) == len(n["text"]) for n in numbers)
        assert labels[k] == (int(numbers[0]["text"]) if numbers[0]["text"] else -1)  # the most confident
    preds = json.loads((tmp_path / "pred.json").read_text())
    assert any(p["bbox"][0] > 400 for p in preds)  # boxes in the whole photo's pixels, not the crop's
