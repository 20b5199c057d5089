import json

import numpy as np
import pytest

from digit_demo.types import Detections
from digit_demo.data import gt_numbers
from digit_demo.evaluation import best, coco_map, evaluate, number_accuracy, plot_sweep, sweep, write_table


def perfect(gt, shift=0.0):
    out = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        out[a["image_id"]].append(a)
    dets = {}
    for i, anns in out.items():
        b = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1) + np.array([shift * b[:, 2].mean() if len(b) else 0, 0, shift * b[:, 2].mean() if len(b) else 0, 0], np.float32)
        dets[i] = Detections(xyxy, np.full(len(anns), 0.9, np.float32), np.array([a["category_id"] - 1 for a in anns]))
    return dets


def test_perfect_predictions_score_one(fixture_gt):
    m = evaluate(fixture_gt, perfect(fixture_gt), 0.5)
    assert m.mAP == pytest.approx(1.0) and m.AP50 == pytest.approx(1.0) and m.accuracy == 1.0


def test_shifted_boxes_lower_map(fixture_gt):
    m = evaluate(fixture_gt, perfect(fixture_gt, shift=0.3), 0.5)
    assert 0.0 <= m.mAP < 0.6
    assert m.accuracy == 1.0  # order and digits unchanged


def test_wrong_digit_lowers_accuracy(fixture_gt):
    dets = perfect(fixture_gt)
    first = fixture_gt["images"][0]["id"]
    dets[first].digits[:] = (dets[first].digits + 1) % 10
    m = evaluate(fixture_gt, dets, 0.5)
    assert m.accuracy == pytest.approx(7 / 8) and m.mAP < 1.0


def test_empty_results_do_not_crash(fixture_gt):
    assert coco_map(fixture_gt, []) == {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    m = evaluate(fixture_gt, {im["id"]: Detections() for im in fixture_gt["images"]}, 0.5)
    assert m.mAP == 0.0 and m.accuracy == 0.0


def test_number_accuracy_uses_minus_one_for_empty():
    assert number_accuracy({1: "49", 2: ""}, {1: 49, 2: -1}) == 1.0
    assert number_accuracy({1: "49", 2: "7"}, {1: 49}) == 0.5


def test_gt_numbers_read_in_annotation_order(fixture_gt):
    nums = gt_numbers(fixture_gt)
    assert len(nums) == 8 and all(n.isdigit() for n in nums.values())
    assert sorted(len(n) for n in nums.values()) == [1, 1, 2, 2, 3, 3, 4, 4]


def test_sweep_picks_best_and_writes_plot_and_table(fixture_gt, tmp_path):
    dets = perfect(fixture_gt)
    for d in dets.values():  # add a low-score wrong digit right after the number, in line with it
        x1, y1, x2, y2 = d.boxes[np.argmax(d.boxes[:, 2])]
        d.boxes = np.concatenate([d.boxes, [[x2 + 1, y1, x2 + 1 + (x2 - x1), y2]]]).astype(np.float32)
        d.scores = np.concatenate([d.scores, [0.3]]).astype(np.float32)
        d.digits = np.concatenate([d.digits, [1]])
    rows = sweep(fixture_gt, dets, thresholds=(0.1, 0.5, 0.95))
    assert [r.threshold for r in rows] == [0.1, 0.5, 0.95]
    assert rows[1].accuracy == 1.0 and rows[0].accuracy < 1.0 and rows[2].accuracy == 0.0
    assert best(rows).threshold == 0.5
    write_table(rows, tmp_path / "t.csv")
    plot_sweep({"m": rows}, tmp_path / "p.png")
    assert (tmp_path / "t.csv").read_text().startswith("threshold,mAP,AP50,AP75,accuracy")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_benchmarks_stored_readings_keep_what_ppocr_read():
    """The benchmark sweeps stored readings: PP-OCR's reading of a line must survive the round trip,
    or the sweep would score a number the user never gets."""
    import benchmark
    from digit_demo.pipeline import Reading
    from digit_demo.types import Detections, Found, TextReading

    dets = Detections(np.array([[10, 10, 40, 90], [50, 12, 80, 92]], np.float32), np.array([0.9, 0.9], np.float32), np.array([4, 9]))
    found = Found(dets, text=TextReading("48", 0.99, (10, 10, 80, 92), 0.95, "48"))
    back = benchmark.from_json(json.loads(json.dumps(benchmark.to_json({7: Reading.of("7.png", found)}))))[7]
    assert back.number(0.5).text == "48"  # PP-OCR, 0.99 sure, over the readers' 0.81
    assert back.regions[0].raw.text == found.text
