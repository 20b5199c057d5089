"""The whole-number reader: its crops, CTC scoring, how assembly uses it, the shipped checkpoint, its trainer."""
import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from digit_demo.assemble import assemble
from digit_demo.checkpoints import CheckpointError
from digit_demo.data import annotations_by_image, clipped_boxes, gt_numbers
from digit_demo.detect import to_tensor
from digit_demo.judge import LEAD_MARGIN, read
from digit_demo.images import load_image
from digit_demo.number_reader import (BLANK, HEIGHT, LINE_MARGIN, REGION_THRESHOLD, WIDTH, NumberReader, column_as_row, crop_boxes, crop_numbers,
                                      greedy_text, line_log_prob, load_number_reader, number_region, optional_number_reader,
                                      place, read_region)
from digit_demo.pipeline import Pipeline, PipelineConfig, read_number_line
from digit_demo.reader import load_reader
from digit_demo.types import Detections, Found, LeadReading, LineReading, TextReading
from train.number_reader import main

from .conftest import FIXTURES, raw_detections, raw_of


def line_for(text: str, steps: int = 8, sure: float = 0.98) -> np.ndarray:
    """Log-probabilities of a reading that is ``sure`` of ``text``, one character per other step."""
    p = np.full((steps, BLANK + 1), (1 - sure) / BLANK, np.float32)
    p[:, BLANK] = sure
    for k, c in enumerate(text):
        p[2 * k + 1] = (1 - sure) / BLANK
        p[2 * k + 1, int(c)] = sure
    return np.log(p)


def found(dets: Detections, line=None, proposal=None, lead=None, others=()) -> Found:
    """What a pipeline would have found: ``dets``, a ``line`` reading (log-probabilities) with the
    shipped default margin and the ``proposal``, and an ensemble's ``lead`` reading with its ``others``."""
    return Found(dets, None if line is None else LineReading(line, LINE_MARGIN, proposal),
                 None if lead is None else LeadReading(lead, others))


def test_crops_keep_the_readers_aspect_and_hold_the_region():
    regions = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 200.0, 10.0]])
    boxes = crop_boxes(regions)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.allclose(w / h, torch.full((2,), WIDTH / HEIGHT))
    assert (boxes[:, :2] <= regions[:, :2]).all() and (boxes[:, 2:] >= regions[:, 2:]).all()
    assert torch.allclose((boxes[:, :2] + boxes[:, 2:]) / 2, (regions[:, :2] + regions[:, 2:]) / 2)
    assert crop_numbers(torch.rand(3, 50, 60), regions).shape == (2, 3, HEIGHT, WIDTH)
    digits = torch.tensor([[10.0, 10.0, 20.0, 30.0], [22.0, 12.0, 32.0, 32.0]])
    assert number_region(digits, 0.5, 0.25).tolist() == [0.0, 5.0, 42.0, 37.0]  # padded by the median height (20)


def test_ctc_scores_are_probabilities_of_whole_readings():
    line = torch.randn(2, BLANK + 1).log_softmax(1).numpy()
    texts = [""] + [str(d) for d in range(10)] + ["".join(p) for p in itertools.product("0123456789", repeat=2)]
    assert np.exp(line_log_prob(line, texts)).sum() == pytest.approx(1.0, abs=1e-4)  # every reading of two steps
    sure = line_for("41")
    scores = dict(zip(["41", "4", "1", "", "14", "411"], line_log_prob(sure, ["41", "4", "1", "", "14", "411"])))
    assert max(scores, key=scores.get) == "41" and scores["41"] > np.log(0.8)
    assert greedy_text(torch.from_numpy(sure)[None]) == ["41"]
    assert greedy_text(torch.from_numpy(line_for("1100"))[None]) == ["1100"]  # repeats need a blank between them


def test_the_line_reading_settles_how_many_digits_the_number_has():
    dets = Detections(np.array([[10, 10, 20, 30], [21, 10, 31, 30]], np.float32), np.array([0.9, 0.3], np.float32),
                      np.array([4, 1]))
    assert read(found(dets), 0.5).text == "4"  # no line: the threshold decides
    with_line = found(dets, line_for("41"))
    number = read(with_line, 0.5)
    assert number.text == "41" and len(number.digits) == 2  # the faint "1" is back, with its box
    assert read(with_line, 0.5, judge=False).text == "4"
    assert read(found(dets, line_for("4")), 0.2).text == "4"  # and it drops one
    assert read(found(dets, line_for("41", sure=0.5)), 0.5).text == "4"  # a weak preference does not overrule the threshold


def test_place_puts_each_digit_read_where_it_was_read():
    p = np.full((8, BLANK + 1), 0.01 / BLANK, np.float32)
    p[:, BLANK] = 0.99
    for cols, digit, sure in (((1, 2), 4, 0.9), ((4,), 1, 0.7), ((6,), 6, 0.8)):
        for c in cols:
            p[c] = (1 - sure) / BLANK
            p[c, digit] = sure
    crop = torch.tensor([0.0, 0.0, 80.0, 20.0])  # 10 px per column
    placed = place(torch.from_numpy(np.log(p)), crop, torch.tensor([[10.0, 5, 18, 15], [60, 5, 68, 15], [40, 4, 48, 18]]))
    assert placed.digits.tolist() == [4, 1, 6]
    assert np.allclose((placed.boxes[:, 0] + placed.boxes[:, 2]) / 2, [20, 45, 65])  # centres of their columns
    assert np.allclose(placed.boxes[:, 2] - placed.boxes[:, 0], 8) and np.allclose(placed.boxes[:, [1, 3]], [[5, 15]])
    assert np.allclose(placed.scores, [0.9, 0.7, 0.8])
    blank = np.log(np.full((8, BLANK + 1), 0.01 / BLANK, np.float32))
    blank[:, BLANK] = np.log(0.99)
    assert len(place(torch.from_numpy(blank), crop, torch.tensor([[10.0, 5, 18, 15]]))) == 0


def test_a_proposal_restores_a_digit_the_detector_missed_and_keeps_the_detected_boxes():
    dets = Detections(np.array([[10, 10, 20, 30], [32, 10, 42, 30]], np.float32), np.array([0.9, 0.8], np.float32),
                      np.array([4, 6]))
    proposal = Detections(np.array([[10, 11, 20, 31], [21, 11, 31, 31], [33, 11, 43, 31]], np.float32),
                          np.array([0.95, 0.6, 0.9], np.float32), np.array([4, 1, 6]))
    number = read(found(dets, line_for("416"), proposal), 0.5)
    assert number.text == "416"
    assert np.array_equal(number.digits.boxes, np.stack([dets.boxes[0], proposal.boxes[1], dets.boxes[1]]))
    assert np.allclose(number.digits.scores, [0.9, 0.6, 0.8])  # detected digits keep the detector's scores
    assert read(found(dets, line_for("416")), 0.5).text == "46"  # the line alone cannot add a digit nothing detected
    assert read(found(dets, line_for("416"), proposal), 0.5, judge=False).text == "46"
    swapped = Detections(proposal.boxes[[0, 2]], np.array([0.95, 0.7], np.float32), np.array([4, 5]))
    number = read(found(dets, line_for("45"), swapped), 0.5)
    assert number.text == "45" and np.array_equal(number.digits.boxes, dets.boxes)
    assert np.allclose(number.digits.scores, [0.9, 0.7])  # a digit read differently scores as the proposer read it
    wide = Detections(np.array([[10, 10, 20, 30], [24, 10, 42, 30]], np.float32), dets.scores, dets.digits)
    narrow = Detections(np.array([[10, 11, 20, 31], [24, 11, 34, 31], [30, 11, 40, 31]], np.float32),
                        proposal.scores, proposal.digits)  # a "1" read inside the box the detector drew around "16"
    number = read(found(wide, line_for("416"), narrow), 0.5)
    assert number.text == "416" and np.array_equal(number.digits.boxes, np.stack([wide.boxes[0], narrow.boxes[1], wide.boxes[1]]))
    above = Detections(np.array([[10, 10, 20, 30], [32, -15, 42, 5]], np.float32), dets.scores, dets.digits)
    number = read(found(above, line_for("45"), swapped), 0.5)  # a box off the line is not where the 5 was read
    assert number.text == "45" and np.array_equal(number.digits.boxes, np.stack([above.boxes[0], swapped.boxes[1]]))


@pytest.fixture(scope="module")
def number_reader():
    return load_number_reader()


def test_shipped_number_reader_reads_real_fixture_numbers(number_reader, fixture_gt):
    anns, numbers = annotations_by_image(fixture_gt), gt_numbers(fixture_gt)
    right = 0
    for im in fixture_gt["images"]:
        img = load_image(FIXTURES / "valid" / im["file_name"])
        boxes, _ = clipped_boxes(anns[im["id"]], img.width, img.height)
        with torch.inference_mode():
            right += greedy_text(number_reader(crop_numbers(to_tensor(img), number_region(boxes)[None])))[0] == numbers[im["id"]]
    assert right >= len(numbers) // 2  # hard photos (the default detector reads 4 of them too)
    meta = number_reader.meta
    assert meta["architecture"] == "number_reader_crnn" and meta["weights_dtype"] == "float16"
    assert meta["metrics"]["valid_number_accuracy_true_boxes"] > 0.6


def test_a_column_is_laid_out_as_a_row_top_digit_first():
    # two 20 x 40 digits stacked in a 40 x 120 image: cut out at their height (40), side by side after a
    # 40 px margin, with 20 px above and below; each cut holds its own pixels
    image = torch.rand(3, 120, 40)
    boxes = torch.tensor([[10.0, 60, 30, 100], [10, 10, 30, 50]])  # the lower digit listed first
    row, row_boxes = column_as_row(image, boxes)
    assert row.shape == (3, 80, 120)
    assert torch.equal(row_boxes, torch.tensor([[40.0, 20, 60, 60], [60, 20, 80, 60]]))
    assert torch.allclose(row[:, 20:60, 40:60], image[:, 10:50, 10:30], atol=1e-6)  # the top digit first
    assert torch.allclose(row[:, 20:60, 60:80], image[:, 60:100, 10:30], atol=1e-6)


def stacks(fonts, n: int = 24):
    """``n`` drawn vertical house numbers of 2-4 digits: (text, CHW image, digit boxes as SVHN labels
    them, the ink grown 18%)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        text = "".join(str(d) for d in [rng.integers(1, 10), *rng.integers(0, 10, rng.integers(1, 4))])
        font = ImageFont.truetype(str(fonts[k % len(fonts)]), int(rng.integers(24, 60)))
        fg, bg = ((20, 20, 20), (230, 220, 200)) if k % 2 else ((230, 220, 200), (30, 60, 120))
        im = Image.new("RGB", (200, 90 * len(text) + 40), bg)
        draw, boxes, y = ImageDraw.Draw(im), [], 20
        for ch in text:
            l, t, r, b = draw.textbbox((60, y), ch, font=font)
            draw.text((60, y), ch, font=font, fill=fg)
            boxes.append([l - 0.09 * (r - l), t - 0.09 * (b - t), r + 0.09 * (r - l), b + 0.09 * (b - t)])
            y = b + int(rng.integers(4, 20))
        out.append((text, to_tensor(im), torch.tensor(boxes, dtype=torch.float32)))
    return out


def test_the_number_reader_reads_a_vertical_stack_top_to_bottom(number_reader):
    cases = stacks([FIXTURES / "fonts" / "DejaVuSans-Bold-ascii.ttf"])
    with torch.inference_mode():
        lines = [read_region(number_reader, image, boxes, text)[0] for text, image, boxes in cases]
    read_as = [greedy_text(torch.from_numpy(line)[None])[0] for line in lines]
    assert sum(r == t for r, t in zip(read_as, [t for t, _, _ in cases])) >= 0.85 * len(cases), read_as
    # and the line prefers the stack read downwards to it read upwards
    ups = [line_log_prob(line, [t, t[::-1]]) for line, (t, _, _) in zip(lines, cases) if t != t[::-1]]
    assert sum(down > up for down, up in ups) >= 0.9 * len(ups)


def test_detector_reads_the_line_with_the_shipped_number_reader(fixture_gt, fixture_images):
    names = {im["id"]: im["file_name"] for im in fixture_gt["images"]}
    paths = [fixture_images / n for n in names.values()]
    with_line = raw_detections(None, paths)
    without = raw_detections(PipelineConfig(number_reader=None), paths)
    assert all(f.line is not None and f.line.log_probs.shape == (WIDTH // 4, BLANK + 1) for f in with_line)
    assert all(f.line is None for f in without)
    # the shipped reader comes with its proposer, asked where its own reading and the detections' disagree
    asked = [greedy_text(torch.from_numpy(f.line.log_probs)[None])[0] != assemble(b.detections, REGION_THRESHOLD).text
             for f, b in zip(with_line, without)]
    assert any(asked) and [f.line.proposal is not None for f in with_line] == asked
    for a, b in zip(with_line, without):  # the same digits, only the reading of the line is added
        assert np.array_equal(a.detections.boxes, b.detections.boxes) and np.array_equal(a.detections.scores, b.detections.scores)
    numbers = gt_numbers(fixture_gt)  # hard photos: the default reads 4 of the 8 without the line reader
    right = sum(read(f, 0.3).text == numbers[i] for i, f in zip(names, with_line))
    assert right >= max(4, sum(read(f, 0.3).text == numbers[i] for i, f in zip(names, without)))
    assert read_number_line(optional_number_reader(), torch.rand(3, 40, 60), Detections()) is None  # nothing to read


def test_wrong_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a number reader"):
        load_number_reader("resnet18_fpn")
    assert optional_number_reader(None) is None
    assert optional_number_reader(proposer=None).proposer is None
    assert optional_number_reader().proposer.backbone == "reader"
    with pytest.raises(CheckpointError, match="not a number reader"):
        optional_number_reader(proposer="digit_reader")
    with pytest.raises(CheckpointError):
        optional_number_reader(tmp_path / "missing")


def test_short_training_run_exports_a_loadable_number_reader(tmp_path, capsys):
    out = tmp_path / "number_reader"
    args = ["--data", str(FIXTURES), "--train-json", "valid.json", "--train-images", "valid", "--epochs", "2",
            "--width", "8", "--hidden", "16", "--batch-size", "4", "--quiet", "--out", str(out),
            "--self-train", "resnet18_fpn", "--extra-images", "valid", "--limit", "4", "--min-confidence", "0.5"]
    assert main(args) == 0
    model = load_number_reader(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert model.width == 8 and model.hidden == 16 and meta["recipe"]["epochs"] == 2
    assert meta["data"]["train_images"] == 4 and 1 <= meta["data"]["self_labelled"]["count"] <= 4
    assert len(meta["history"]) == 2 and 0 <= meta["metrics"]["valid_number_accuracy_true_boxes"] <= 1
    assert model(torch.rand(2, 3, HEIGHT, WIDTH)).shape == (2, WIDTH // 4, BLANK + 1)
    capsys.readouterr()
    assert main(args) == 0  # the same command again resumes after its last epoch: nothing left to train
    assert "after epoch 2" in capsys.readouterr().err


def test_reader_backbone_starts_from_the_digit_reader_and_round_trips(tmp_path):
    reader = load_reader()
    model = NumberReader(reader.width, 16, backbone="reader")
    model.init_from_reader(reader)
    crop = torch.rand(1, 3, 32, 32)
    # on a digit-sized square crop the first three blocks compute exactly the digit reader's features
    assert torch.allclose(model.cnn[:3].eval()(crop), reader.net[:3].eval()(crop))
    with pytest.raises(ValueError, match="width"):
        NumberReader(8, 16, backbone="reader").init_from_reader(reader)
    with pytest.raises(ValueError, match="backbone"):
        NumberReader(8, 16, backbone="resnet")

    out = tmp_path / "number_reader"
    args = ["--data", str(FIXTURES), "--train-json", "valid.json", "--train-images", "valid", "--epochs", "1",
            "--hidden", "16", "--batch-size", "4", "--quiet", "--out", str(out), "--limit", "4",
            "--backbone", "reader", "--init-reader", "digit_reader"]
    assert main(args) == 0
    loaded = load_number_reader(out)
    assert loaded.backbone == "reader" and json.loads(out.with_suffix(".json").read_text())["recipe"]["init_reader"]
    assert loaded(torch.rand(2, 3, HEIGHT, WIDTH)).shape == (2, WIDTH // 4, BLANK + 1)


def test_an_ensemble_keeps_its_lead_members_reading_unless_another_member_and_the_line_prefer_the_fused_one():
    fused = Detections(np.array([[10, 10, 20, 30], [21, 10, 31, 30]], np.float32), np.array([0.9, 0.8], np.float32),
                       np.array([1, 7]))
    lead = assemble(Detections(fused.boxes[:1], fused.scores[:1], np.array([4])), 0.5)
    others = ("17",)  # another member read 17 alone
    assert read(found(fused, line_for("17"), lead=lead, others=others), 0.5).text == "17"  # the line is sure of the fused reading
    # no other member read the fused number on its own: the lead member's reading stands, however sure the line
    assert read(found(fused, line_for("17"), lead=lead, others=("1",)), 0.5).text == "4"
    assert read(found(fused, line_for("17"), lead=lead), 0.5).text == "4"
    assert read(found(fused, line_for("4"), lead=lead, others=others), 0.5).text == "4"
    unsure = np.logaddexp(line_for("17"), line_for("4"))  # as likely either way: the lead member's reading stands
    assert read(found(fused, unsure, lead=lead, others=others), 0.5).text == "4"
    assert read(found(fused, None, lead=lead, others=others), 0.5).text == "4"  # no line to judge by
    nothing = assemble(Detections(), 0.5)
    assert read(found(fused, None, lead=nothing, others=others), 0.5).text == "17"  # the lead member read nothing
    # the fused reading must be likelier by LEAD_MARGIN nats (more than LINE_MARGIN) to replace the lead's
    lines = [np.logaddexp(np.log(w) + line_for("17"), np.log(1 - w) + line_for("4")) for w in np.linspace(0.5, 0.9999, 400)]
    gaps = [np.subtract(*line_log_prob(x, ["17", "4"])) for x in lines]
    between = next(x for x, g in zip(lines, gaps) if LINE_MARGIN < g < LEAD_MARGIN)
    beyond = next(x for x, g in zip(lines, gaps) if g > LEAD_MARGIN)
    assert read(found(fused, between, lead=lead, others=others), 0.5).text == "4"
    assert read(found(fused, beyond, lead=lead, others=others), 0.5).text == "17"


def test_where_an_ensemble_and_its_lead_member_agree_the_number_is_as_sure_as_the_surer():
    boxes = np.array([[10, 10, 20, 30], [21, 10, 31, 30]], np.float32)
    fused = Detections(boxes, np.array([0.6, 0.5], np.float32), np.array([1, 7]))  # "17", 0.6 x 0.5 = 0.30 sure
    sure = assemble(Detections(boxes, np.array([0.95, 0.9], np.float32), np.array([1, 7])), 0.5)  # 0.855 sure
    assert read(found(fused, lead=sure), 0.5).confidence == pytest.approx(0.95 * 0.9)
    unsure = assemble(Detections(boxes, np.array([0.5, 0.5], np.float32), np.array([1, 7])), 0.5)  # 0.25: the fused stands
    assert read(found(fused, lead=unsure), 0.5).confidence == pytest.approx(0.6 * 0.5)
    # PP-OCR 0.6 sure of "71" overrules the fused digits alone (0.30), not them with the lead's agreement (0.855)
    text = TextReading("71", 0.6, (10.0, 10.0, 31.0, 30.0))
    assert read(replace(found(fused), text=text), 0.5).text == "71"
    assert read(replace(found(fused, lead=sure), text=text), 0.5).text == "17"
    assert read(replace(found(fused, lead=unsure), text=text), 0.5).text == "71"


def test_an_ensemble_carries_its_most_accurate_members_own_reading(fixture_gt, fixture_images):
    paths = [fixture_images / im["file_name"] for im in fixture_gt["images"]]
    ens = Pipeline(PipelineConfig(("mobilenet_v3_fpn", "resnet18_fpn"), locator=None))  # crops read whole
    lead, other = ens.members[1], ens.members[0]
    assert lead.meta["metrics"]["valid"]["accuracy"] > other.meta["metrics"]["valid"]["accuracy"]
    readings = [read(f, lead.meta["threshold"]) for f in raw_detections(PipelineConfig(("resnet18_fpn",)), paths)]
    assert any(r.text for r in readings)
    seconds = [read(f, other.meta["threshold"]).text for f in raw_detections(PipelineConfig(("mobilenet_v3_fpn",)), paths)]
    for f, r, second in zip(raw_of(ens.read(paths)), readings, seconds):
        assert f.line is not None and f.lead.number.text == r.text and f.lead.others == (second,)
        assert np.array_equal(f.lead.number.digits.boxes, r.digits.boxes)
