import csv
import json
import zipfile

import numpy as np
from PIL import Image

from digit_demo.types import Detections
from digit_demo.draw import PALETTE, draw_detections
from digit_demo.pipeline import Reading
from digit_demo.session import Session, write_downloads

from .conftest import FIXTURES


def item():
    img = Image.open(FIXTURES / "valid" / "1108.png").convert("RGB")
    raw = Detections(np.array([[10, 10, 40, 90], [50, 12, 80, 92]], np.float32), np.array([0.9, 0.4], np.float32),
                     np.array([4, 9]))
    return Reading.of("1108.png", raw, img)


def test_render_rethresholds_cached_detections(tmp_path):
    s = Session("m", [item(), Reading("bad.png", error="bad.png: not a readable image")])
    assert len(s.render(0.3)) == 1 and s.render(0.3)[0].number.text == "49"  # the unreadable one is not drawn
    low, high = s.render(0.3)[0], s.render(0.5)[0]
    assert high.number.text == "4" and high.annotated.size == low.annotated.size
    files = write_downloads(s.render(0.5), 0.5, tmp_path)
    assert [f.name for f in files] == ["pred.json", "pred.csv", "annotated.zip"]
    assert json.loads(files[0].read_text())[0]["category_id"] == 5
    assert list(csv.reader(files[1].open())) == [["image_id", "pred_label"], ["1108", "4"]]
    assert zipfile.ZipFile(files[2]).namelist() == ["1108_annotated.jpg"]


def test_draw_uses_the_digit_colour():
    img = Image.new("RGB", (100, 50), "white")
    d = Detections(np.array([[10, 10, 40, 45]], np.float32), np.array([0.9], np.float32), np.array([3]))
    out = draw_detections(img, d, min_side=50)
    colour = tuple(int(PALETTE[3][i : i + 2], 16) for i in (1, 3, 5))
    assert out.getpixel((25, 44)) == colour  # bottom edge of the box


def test_drawing_stays_a_sensible_size_for_any_shape():
    d = Detections(np.array([[0, 0, 4, 8]], np.float32), np.array([0.9], np.float32), np.array([1]))
    for size in ((20000, 8), (8, 20000), (4000, 3000), (30, 20)):
        out = draw_detections(Image.new("RGB", size, "white"), d)
        assert max(out.size) <= 2048 and min(out.size) >= 1
        if min(size) < 320 and max(size) * 320 / min(size) <= 2048:  # small photos: enlarged to a 320 px short side
            assert min(out.size) == 320
