import csv
import json
import zipfile

import numpy as np
from PIL import Image

from digit_demo.types import Detections, Found
from digit_demo.draw import DETAIL_SIDE, OVERVIEW_SIDE, PALETTE, draw_detections, draw_regions
from digit_demo.pipeline import Reading
from digit_demo.reading import RegionReading
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


def test_a_large_photo_is_kept_only_as_large_as_it_is_drawn_and_draws_as_from_the_photo_itself():
    # a 12-megapixel photo with SVHN's "49" (1108.png, x6) in a 3000 x 1500 region of it
    photo = Image.new("RGB", (4032, 3024), (90, 110, 80))
    photo.paste(Image.open(FIXTURES / "valid" / "1108.png").convert("RGB").resize((6 * 92, 6 * 57)), (1600, 1400))
    crop = (500, 1000, 3500, 2500)
    digits = Detections(np.array([[1160, 460, 1340, 940], [1400, 472, 1580, 952]], np.float32),  # in the crop's pixels
                        np.array([0.9, 0.4], np.float32), np.array([4, 9]))
    region = RegionReading(np.array([1600, 1400, 2160, 1750], np.float32), 0.8, crop, Found(digits))
    s = Session("m", [Reading("street.jpg", photo, regions=[region])])
    assert s.readings[0].image is None  # the decoded photo is not kept
    (pic,) = s.pictures
    kept = [im for im, _ in pic.crops.values()] + [pic.overview[0]]
    assert max(max(im.size) for im in kept) <= DETAIL_SIDE and pic.overview[0].size == (OVERVIEW_SIDE, 960)
    assert sum(im.width * im.height for im in kept) < photo.width * photo.height / 3  # a third of the photo: the region is large
    for t, number in ((0.3, "49"), (0.5, "4")):  # drawn as from the whole photo: the same pixels
        (r,) = s.render(t)
        assert r.number.text == number
        shown = Detections(digits.boxes[: len(number)], digits.scores[: len(number)], digits.digits[: len(number)])
        assert np.array_equal(np.asarray(r.annotated), np.asarray(draw_detections(photo.crop(crop), shown)))
        marked = draw_regions(photo, [region.box], [number])
        assert np.array_equal(np.asarray(r.whole), np.asarray(marked))


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
