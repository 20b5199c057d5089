"""Synthetic house numbers (train.synth): exact labels, reproducible, and readable as house numbers."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from digit_demo.data import DigitDataset, gt_numbers, load_coco
from train.synth import BOX_GROW, STYLES, find_fonts, render, render_real, write_synthetic


def backgrounds(n: int = 4) -> list[Image.Image]:
    """Textured stand-ins for photos: colour ramps, noise and a few rectangles (no digits)."""
    rng = np.random.default_rng(5)
    out = []
    for _ in range(n):
        pixels = rng.uniform(30, 220, 3) + np.linspace(0, 50, 640)[None, :, None] + rng.normal(0, 10, (480, 640, 3))
        for _ in range(6):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            pixels[y:y + rng.integers(10, 80), x:x + rng.integers(10, 80)] = rng.uniform(0, 255, 3)
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def fonts() -> list[Path]:
    from .conftest import FIXTURES

    return find_fonts() or find_fonts(FIXTURES / "fonts")  # the system's, else the tests' own DejaVu cut


@pytest.fixture(scope="module")
def written(tmp_path_factory, fonts) -> Path:
    return write_synthetic(40, backgrounds(), fonts, seed=3, out=tmp_path_factory.mktemp("synth"))


def test_each_digit_box_holds_its_own_ink_and_nothing_else(fonts):
    # on a flat background, without plates or shadows, the only pixels that differ are the digits' ink:
    # every differing pixel lies in some box, and every box holds ink
    rng = np.random.default_rng(0)
    flat = [Image.new("RGB", (640, 480), (128, 128, 128))]
    for _ in range(20):
        s = render(flat, fonts, rng, plate=0.0, shadow=0.0)
        pixels = np.asarray(s.image).astype(int)
        ink = np.abs(pixels - pixels[0, 0]).max(2) > 60  # the corner is background (the number never fills it)
        inside = np.zeros_like(ink)
        for x1, y1, x2, y2 in s.boxes:
            box = ink[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
            assert box.any(), "every box holds ink"
            inside[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
        assert (ink & ~inside).sum() <= 0.02 * ink.sum(), "ink outside every box (blur and JPEG may bleed a little)"


def test_written_set_is_an_hw2_coco_file_the_trainers_read(written):
    coco = load_coco(written)
    numbers = gt_numbers(coco)
    assert len(coco["images"]) == 40 and len(numbers) == 40
    assert {len(t) for t in numbers.values()} <= {1, 2, 3, 4} and all(t[0] != "0" for t in numbers.values())
    data = DigitDataset(written.parent / "images", written)
    for k in range(len(data)):
        image, target = data[k]
        boxes, labels = target["boxes"], target["labels"]
        h, w = image.shape[-2:]
        assert len(boxes) == len(numbers[target["image_id"]]) and (labels >= 1).all() and (labels <= 10).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
        assert "".join(str(int(d) - 1) for d in labels[torch.argsort(boxes[:, 0])]) == numbers[target["image_id"]]
    assert BOX_GROW[0] > 1 and BOX_GROW[1] > 1


def test_the_same_seed_writes_the_same_images(written, fonts, tmp_path):
    again = write_synthetic(40, backgrounds(), fonts, seed=3, out=tmp_path / "again")
    assert again.read_bytes() == written.read_bytes()
    assert (again.parent / "images" / "synth_000040.jpg").read_bytes() == (written.parent / "images" / "synth_000040.jpg").read_bytes()
    other = write_synthetic(5, backgrounds(), fonts, seed=4, out=tmp_path / "other")
    assert gt_numbers(load_coco(other)) != {k: v for k, v in gt_numbers(load_coco(written)).items() if k <= 5}


@pytest.mark.slow
def test_the_shipped_pipeline_reads_them_as_house_numbers(written, default_pipeline):
    # a model trained only on real SVHN photos is the oracle: it reads most of them, on the labelled boxes
    coco = load_coco(written)
    truth = gt_numbers(coco)
    readings = default_pipeline.read([written.parent / "images" / im["file_name"] for im in coco["images"]]).at()
    read = [r.text == truth[im["id"]] for im, r in zip(coco["images"], readings)]
    assert np.mean(read) >= 0.6
    matched = total = 0
    for im, r in zip(coco["images"], readings):
        gt = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                           for a in coco["annotations"] if a["image_id"] == im["id"]])
        total += len(gt)
        if len(r.digits.boxes):
            matched += int((box_iou(gt, torch.as_tensor(r.digits.boxes)).max(1).values >= 0.5).sum())
    assert matched >= 0.7 * total


@pytest.mark.slow
def test_the_detector_trainer_takes_them_with_synthetic(written, tmp_path):
    import json

    from digit_demo.card import write_model_card
    from train.cli import main

    from .conftest import FIXTURES

    assert main(["--model", "fasterrcnn_resnet18_fpn", "--data", str(FIXTURES), "--train-json", "valid.json",
                 "--train-images", "valid", "--val-json", "valid.json", "--synthetic", str(written.parent),
                 "--out-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "ck"), "--quiet", "--epochs", "1",
                 "--max-iters", "1", "--batch-size", "2", "--val-limit", "2", "--min-size", "96", "--max-size", "240"]) == 0
    meta = json.loads((tmp_path / "ck" / "resnet18_fpn.json").read_text())
    assert meta["data"]["train_images"] == 8 + 40 and meta["data"]["synthetic"] == [{"folder": str(written.parent), "count": 40}]
    assert "also trained on 40 synthetic house numbers" in write_model_card(tmp_path / "ck").read_text()


def test_the_number_reader_trainer_takes_real_style_numbers(fonts, tmp_path):
    import json

    from train.number_reader import main

    from .conftest import FIXTURES

    real = write_synthetic(12, backgrounds(), fonts, seed=2, out=tmp_path / "real", real_style=True)
    assert load_coco(real)["info"]["real_style"] is True
    out = tmp_path / "number_reader"
    assert main(["--data", str(FIXTURES), "--train-json", "valid.json", "--train-images", "valid", "--epochs", "1",
                 "--width", "8", "--hidden", "16", "--batch-size", "4", "--quiet", "--out", str(out),
                 "--synthetic", str(real.parent)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["data"]["train_images"] == 8 and meta["data"]["synthetic"] == [{"folder": str(real.parent), "count": 12}]
    assert meta["recipe"]["synthetic"] == [str(real.parent)]


def test_real_style_labels_the_digits_and_not_the_letter_after_them(fonts):
    # painted on a flat wall: the digits' boxes hold ink, a letter suffix is drawn right of the last one
    # and labelled nowhere, and every style draws a number whose boxes lie inside the image
    rng = np.random.default_rng(1)
    flat = [Image.new("RGB", (640, 480), (128, 128, 128))]
    suffixes = 0
    for k in range(100):
        s = render_real(flat, fonts, rng, "painted", lighting=False)
        assert len(s.boxes) == len(s.digits) == len(s.text) and s.text[0] != "0"
        assert (np.diff(s.boxes[:, 0]) > 0).all(), "boxes left to right"
        pixels = np.asarray(s.image).astype(int)
        differ = np.abs(pixels - np.median(pixels.reshape(-1, 3), 0)).max(2)
        ink = differ > 0.5 * differ.max()  # blur and a small photo may fade the ink to half its contrast
        for x1, y1, x2, y2 in s.boxes:
            assert ink[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))].any(), "every box holds ink"
        if s.suffix and not s.word:
            suffixes += 1
            y1, y2 = int(s.boxes[:, 1].min()), int(np.ceil(s.boxes[:, 3].max()))
            right = ink[y1:y2, int(np.ceil(s.boxes[-1, 2])) + 1:]
            assert right.sum() > 0.2 * ink[y1:y2, int(s.boxes[-1, 0]):int(np.ceil(s.boxes[-1, 2]))].sum(), s.suffix
    assert suffixes >= 3
    for style in STYLES:
        s = render_real(backgrounds(), fonts, rng, style)
        w, h = s.image.size
        assert len(s.boxes) and (s.boxes[:, :2] >= 0).all() and (s.boxes[:, 2] <= w).all() and (s.boxes[:, 3] <= h).all()


def test_fonts_without_digits_are_not_used(fonts):
    # a font whose digits are all the missing-glyph box would label boxes that hold no digit
    from PIL import ImageFont

    for path in fonts:
        font = ImageFont.truetype(str(path), 40)
        assert len({bytes(font.getmask(str(d))) for d in range(10)}) == 10, path
