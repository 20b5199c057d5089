"""The second-stage digit reader: crops, the shipped checkpoint, refinement, its trainer."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from digit_demo.assemble import Detections, assemble
from digit_demo.checkpoints import CheckpointError, available, load_checkpoint, read_sidecar, resolve
from digit_demo.data import annotations_by_image, clipped_boxes, gt_numbers
from digit_demo.detect import Detector, to_tensor
from digit_demo.pipeline import Pipeline, PipelineConfig
from digit_demo.reader import (BACKGROUND, DEFAULT_READER, DigitReader, crop_digits, crop_fractions,
                               from_crop_fractions, load_reader, optional_reader, refine, save_reader, square_boxes)
from train.reader import background_boxes, main, mine

from .conftest import FIXTURES, raw_of


@pytest.fixture(scope="module")
def reader():
    return load_reader()


def fixture_samples(gt):
    anns = annotations_by_image(gt)
    for im in gt["images"]:
        img = Image.open(FIXTURES / "valid" / im["file_name"]).convert("RGB")
        boxes, labels = clipped_boxes(anns[im["id"]], img.width, img.height)
        yield im["id"], to_tensor(img), boxes, labels - 1


def test_crops_are_squares_around_the_box_and_zero_outside_the_photo():
    image = torch.zeros(3, 40, 60)
    image[:, 10:30, 20:30] = 1.0  # a white 10 x 20 "digit"
    box = torch.tensor([[20.0, 10.0, 30.0, 30.0]])
    assert square_boxes(box, 1.0).tolist() == [[15.0, 10.0, 35.0, 30.0]]
    crop = crop_digits(image, box, size=20, context=1.0)[0]
    assert crop.shape == (3, 20, 20)
    assert crop[:, 2:18, 7:13].min() > 0.99 and crop[:, :, :3].max() < 0.01  # the digit in the middle, dark sides
    corner = crop_digits(image, torch.tensor([[-10.0, -10.0, 10.0, 10.0]]), size=20, context=1.0)[0]
    assert corner.abs().max() == 0  # outside the photo: zeros, not clamped edge pixels


def test_crop_fractions_round_trip():
    around = torch.tensor([[10.0, 20.0, 20.0, 40.0], [0.0, 0.0, 30.0, 15.0]])
    own = crop_fractions(around, around)  # a box in its own crop: centred, its longer side 1 / context
    assert torch.allclose((own[:, :2] + own[:, 2:]) / 2, torch.full((2, 2), 0.5))
    assert torch.allclose((own[:, 2:] - own[:, :2]).amax(1), torch.full((2,), 1 / 1.2))
    other = torch.tensor([[12.0, 18.0, 21.0, 41.0], [3.0, -2.0, 25.0, 16.0]])
    assert torch.allclose(from_crop_fractions(crop_fractions(other, around), around), other, atol=1e-5)


def test_shipped_reader_reads_ground_truth_digits_and_rejects_background(reader, fixture_gt):
    right = total = rejected = negatives = 0
    g = torch.Generator().manual_seed(0)
    for _, image, boxes, digits in fixture_samples(fixture_gt):
        p = reader(crop_digits(image, boxes)).argmax(1)
        right += int((p == digits).sum())
        total += len(digits)
        neg = background_boxes(boxes, image.shape[1], image.shape[2], 4, g)
        rejected += int((reader(crop_digits(image, neg)).argmax(1) == BACKGROUND).sum())
        negatives += len(neg)
    assert total >= 15 and right / total >= 0.85
    assert negatives >= 8 and rejected / negatives >= 0.75


def test_refine_corrects_misread_digits_on_real_photos(reader, fixture_gt):
    """The detector found the right spots but claimed wrong digits: the reader reads them right."""
    fixed = 0
    for _, image, boxes, digits in fixture_samples(fixture_gt):
        wrong = (digits + 3) % 10
        dets = Detections(boxes.numpy(), np.full(len(boxes), 0.7, np.float32), wrong.numpy())
        out = refine(reader, image, dets)
        assert len(out) == 2 * len(boxes)  # the top two digits of every spot, for mAP
        top = assemble(out, threshold=0.05, strays=False, max_gap=None)
        fixed += top.text == "".join(map(str, digits.tolist()))
    assert fixed >= 6  # of 8 photos


def test_refine_drops_spots_the_detector_barely_saw(reader, fixture_gt):
    _, image, boxes, digits = next(fixture_samples(fixture_gt))
    dets = Detections(boxes.numpy(), np.full(len(boxes), 0.02, np.float32), digits.numpy())
    assert len(refine(reader, image, dets)) == 0
    assert len(refine(reader, image, Detections())) == 0


def test_verify_weighs_the_readers_own_presence_against_the_detectors(reader, fixture_gt):
    _, image, boxes, digits = next(fixture_samples(fixture_gt))
    sure, unsure = (Detections(boxes.numpy(), np.full(len(boxes), s, np.float32), digits.numpy()) for s in (0.8, 0.2))
    plain = [refine(reader, image, d, top_k=1, verify=0.0) for d in (sure, unsure)]
    assert np.allclose(plain[0].scores, 4 * plain[1].scores)  # the detector's presence scales the scores
    own = [refine(reader, image, d, top_k=1, verify=1.0) for d in (sure, unsure)]
    assert np.allclose(own[0].scores, own[1].scores)  # only the reader's: presence no longer matters
    p = reader(crop_digits(image, boxes)).detach().softmax(1)
    assert np.allclose(np.sort(own[0].scores), np.sort(p[:, :BACKGROUND].amax(1).numpy()), atol=1e-5)
    assert reader.settings.verify == read_sidecar(resolve(DEFAULT_READER))["config"].get("verify", 0.0)


def test_mined_spots_are_labelled_by_the_true_boxes(fixture_gt):
    from torchvision.ops import box_iou

    samples = [(image.mul(255).to(torch.uint8), boxes, digits) for _, image, boxes, digits in fixture_samples(fixture_gt)]
    mined = mine(Detector.load("resnet18_fpn"), samples, quiet=True)
    assert len(mined) == len(samples) and sum(len(m[1]) for m in mined) >= len(samples)
    for (_, boxes, digits), (spots, labels, truth) in zip(samples, mined):
        if not len(spots):
            continue
        iou = box_iou(spots, boxes)
        digit = labels != BACKGROUND
        assert (iou[~digit].amax(1) < 0.3).all()
        best = iou[digit].argmax(1)
        assert (iou[digit].amax(1) >= 0.5).all() and torch.equal(labels[digit], digits[best])
        assert torch.equal(truth[digit], boxes[best])


def test_detector_uses_the_shipped_reader_unless_told_not_to(fixture_gt, fixture_images):
    with_reader, plain = Pipeline(PipelineConfig(number_reader=None)), Pipeline(PipelineConfig(digit_reader=None))
    assert with_reader.digit_reader is not None and plain.digit_reader is None and plain.number_reader is None
    paths = [fixture_images / im["file_name"] for im in fixture_gt["images"]]
    a = [f.detections for f in raw_of(with_reader.read(paths))]
    b = [f.detections for f in raw_of(plain.read(paths))]
    assert any(len(x) != len(y) or not np.allclose(x.scores[:1], y.scores[:1]) for x, y in zip(a, b))
    truth = gt_numbers(fixture_gt)  # eight hard photos: the detector alone reads four

    def read(found):
        return sum(assemble(d, 0.4).text == truth[im["id"]] for d, im in zip(found, fixture_gt["images"]))
    assert read(a) >= max(4, read(b))
    ens = Pipeline(PipelineConfig(("resnet18_fpn", "mobilenet_v3_fpn"), digit_reader=None))
    assert all(m.reader is None for m in ens.members)


def test_reader_and_detector_checkpoints_are_not_confused(tmp_path):
    assert DEFAULT_READER not in available() and "resnet18_fpn" in available()
    with pytest.raises(CheckpointError, match="not a digit reader"):
        load_reader("resnet18_fpn")
    with pytest.raises(CheckpointError, match="cannot be built"):
        load_checkpoint(DEFAULT_READER)
    with pytest.raises(CheckpointError, match="not found"):
        optional_reader(tmp_path / "missing_reader")
    bad = tmp_path / "wide.safetensors"
    save_reader(DigitReader(width=8), bad, {})
    meta = json.loads(bad.with_suffix(".json").read_text())
    meta["config"]["width"] = 16
    bad.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_reader(bad)


def test_short_training_run_exports_a_loadable_reader(tmp_path):
    out = tmp_path / "reader"
    args = ["--data", str(FIXTURES), "--train-json", "valid.json", "--train-images", "valid", "--epochs", "2",
            "--width", "8", "--batch-size", "16", "--quiet", "--out", str(out)]
    assert main(args) == 0
    model = load_reader(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert model.width == 8 and meta["architecture"] == "digit_reader_cnn" and meta["weights_dtype"] == "float16"
    assert meta["recipe"]["epochs"] == 2 and meta["data"]["train_images"] == 8
    assert {"valid_digit_accuracy", "valid_background_accuracy", "valid_refined_box_iou"} <= set(meta["metrics"])
    assert resolve(out).suffix == ".safetensors"
    assert model.box is not None and meta["config"]["box_head"]
    crops = torch.rand(3, 3, 32, 32)
    logits, where = model.read(crops)
    assert logits.shape == (3, 11) and where.shape == (3, 4) and torch.equal(model(crops), logits)
    assert main(args[:-1] + [str(tmp_path / "plain"), "--box-weight", "0"]) == 0
    assert load_reader(tmp_path / "plain").box is None and load_reader(tmp_path / "plain").read(crops)[1] is None


def test_training_with_a_detectors_false_boxes_picks_a_verify_weight(tmp_path):
    out = tmp_path / "reader"
    assert main(["--data", str(FIXTURES), "--train-json", "valid.json", "--train-images", "valid", "--epochs", "1",
                 "--width", "8", "--batch-size", "16", "--quiet", "--out", str(out),
                 "--hard-negatives", "resnet18_fpn", "--verify", "0", "1"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    mined = meta["data"]["hard_negatives"]
    assert mined["detector"] == "resnet18_fpn" and mined["train_spots"] >= 8 and mined["train_false_boxes"] <= mined["train_spots"]
    rows = meta["verify_sweep"]["rows"]
    assert sorted(r["verify"] for r in rows) == [0.0, 1.0] and rows[0]["accuracy"] >= rows[1]["accuracy"]
    assert load_reader(out).settings.verify == meta["config"]["verify"] == rows[0]["verify"]
    assert {"valid_spot_digit_accuracy", "valid_spot_background_accuracy"} <= set(meta["metrics"])


def test_shipped_reader_moves_jittered_boxes_towards_the_digits(reader, fixture_gt):
    """Boxes shifted and resized as a detector's are: the box head brings them closer to the truth."""
    from torchvision.ops import box_iou

    from train.reader import jitter

    g = torch.Generator().manual_seed(0)
    before, after = [], []
    for _, image, boxes, digits in fixture_samples(fixture_gt):
        for _ in range(4):
            moved = jitter(boxes, g)
            dets = Detections(moved.numpy(), np.full(len(boxes), 0.9, np.float32), digits.numpy())
            out = refine(reader, image, dets, top_k=1)
            truth = torch.from_numpy(np.asarray(boxes))
            before.append(box_iou(moved, truth).amax(1))
            after.append(box_iou(torch.from_numpy(out.boxes), truth).amax(1))
    assert reader.box is not None
    before, after = torch.cat(before), torch.cat(after)
    assert len(after) == len(before) >= 60
    assert after.mean() > before.mean() + 0.03


def test_an_interrupted_run_resumes_after_its_last_finished_epoch(tmp_path, monkeypatch, capsys):
    import train.reader as trainer

    out = tmp_path / "reader"
    args = ["--data", str(FIXTURES), "--train-json", "valid.json", "--train-images", "valid", "--epochs", "2",
            "--width", "8", "--batch-size", "16", "--quiet", "--out", str(out)]
    calls, real = [], trainer.accuracy

    def crash_in_epoch_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine's jobs stopped during the second epoch's validation
        return real(*a, **k)

    monkeypatch.setattr(trainer, "accuracy", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(trainer, "accuracy", real)
    capsys.readouterr()
    assert main(args) == 0
    assert "after epoch 1" in capsys.readouterr().err
    state = torch.load(tmp_path / "reader.last.pt", weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [1, 2]  # epoch 1 kept, epoch 2 run again
    assert load_reader(out).width == 8
