import json

import numpy as np

from digit_demo.types import Detections
from digit_demo.io import coco_results, read_pred_csv, read_pred_json, write_pred_csv, write_pred_json


def test_pred_json_is_coco_results(tmp_path):
    d = {7: Detections(np.array([[10, 20, 30, 60]], np.float32), np.array([0.9], np.float32), np.array([0]))}
    path = write_pred_json(tmp_path / "pred.json", d)
    rows = read_pred_json(path)
    assert rows == [{"image_id": 7, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.9, "category_id": 1}]
    assert set(json.loads(path.read_text())[0]) == {"image_id", "bbox", "score", "category_id"}
    assert coco_results({1: Detections()}) == []


def test_pred_csv_round_trip_and_hw2_header(tmp_path):
    path = write_pred_csv(tmp_path / "pred.csv", {12: 49, 3: -1, 5: 7})
    text = path.read_text()
    assert text.splitlines() == ["image_id,pred_label", "3,-1", "5,7", "12,49"]
    assert read_pred_csv(path) == {3: -1, 5: 7, 12: 49}
