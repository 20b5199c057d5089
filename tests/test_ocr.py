"""PP-OCR as the locate stage (``--locator ppocr``): its digit lines become regions, and its reading of
each is weighed against the readers'. Oracles: hand-placed lines and boxes, and photos drawn here whose
text is known."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from digit_demo.judge import read
from digit_demo.ocr import TextLine, TextSettings, available, number_lines
from digit_demo.pipeline import text_regions
from digit_demo.types import Detections, Found, TextReading

needs_ppocr = pytest.mark.skipif(not available(), reason="rapidocr / onnxruntime not installed (requirements.txt)")


def test_lines_with_digits_are_number_lines_and_a_stack_of_single_digits_joins_top_to_bottom():
    lines = [TextLine((10, 10, 200, 40), "Main Street", 0.99), TextLine((300, 10, 360, 40), "12A", 0.95),
             TextLine((500, 100, 520, 130), "9", 0.9), TextLine((501, 135, 521, 165), "0", 0.8),
             TextLine((499, 170, 519, 200), "5", 0.9), TextLine((50, 300, 400, 330), "tel 0123 456789", 0.7)]
    found = number_lines(lines)
    assert [(t.digits, t.stack) for t in found] == [("12", False), ("456789", False), ("905", True)]
    stack = found[2]
    assert stack.box == (499, 100, 521, 200) and stack.score == pytest.approx(0.9 * 0.8 * 0.9)
    # two single digits side by side are not a stack
    assert [t.digits for t in number_lines([TextLine((0, 0, 20, 30), "4", 0.9), TextLine((30, 0, 50, 30), "7", 0.9)])] == ["4", "7"]


def test_a_number_that_fills_the_photo_is_read_whole_and_a_small_one_from_its_padded_line():
    settings = TextSettings()
    big = text_regions([TextLine((20, 10, 180, 60), "49", 0.97)], (200, 100), settings)  # half the height
    assert len(big) == 1 and big[0].whole and big[0].text == TextReading("49", 0.97, (20, 10, 180, 60), settings.min_score_whole, "49")
    (stack,) = text_regions([TextLine((80, 5, 110, 95), "905", 0.8)], (200, 100), settings)  # a vertical stack
    assert stack.whole and stack.text.stacked and stack.text.min_score_misread == settings.min_score
    small = text_regions([TextLine((400, 300, 440, 320), "7", 0.8)], (1000, 800), settings)  # 2.5% of the height
    (region,) = small
    assert not region.whole and region.crop == (390, 294, 450, 326)  # padded by 0.5 / 0.3 of its 20 px height
    assert region.text.box == (10, 6, 50, 26) and region.text.min_score == settings.min_score  # in the crop's pixels
    (alone,) = text_regions([], (640, 480), settings)
    assert alone.whole and alone.text is None


def test_a_large_photo_is_read_line_by_line_and_takes_the_recognizers_sure_reading_a_crop_asks_more():
    # the same 0.92-sure "1685" filling a 1600 x 1200 photo, and a 200 x 100 crop, where the readers saw "3"
    settings = TextSettings()
    readers = dets([(10, 10, 30, 50, 0.32, 3)])
    (photo,) = text_regions([TextLine((300, 200, 1300, 700), "No 1685", 0.92)], (1600, 1200), settings)
    (crop,) = text_regions([TextLine((20, 10, 180, 60), "No 1685", 0.92)], (200, 100), settings)
    assert min(1600, 1200) > settings.settle_side >= min(200, 100)
    assert not photo.whole and photo.crop == (50, 50, 1550, 850)  # padded by 0.5 / 0.3 of its 500 px height
    assert crop.whole
    assert read(Found(readers, text=photo.text), 0.3).text == "1685"
    assert read(Found(readers, text=crop.text), 0.3).text == "3"  # an SVHN-like crop: the readers' home ground


def dets(rows):
    a = np.array(rows, np.float32).reshape(-1, 6)
    return Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int64))


def test_the_surer_reader_wins_and_agreement_keeps_the_higher_confidence():
    two = dets([(10, 10, 30, 50, 0.9, 4), (32, 10, 52, 50, 0.8, 9)])  # the readers read 49 (0.72 sure)
    line = (8, 8, 80, 52)
    assert read(Found(two, text=TextReading("49", 0.6, line)), 0.5).confidence == pytest.approx(0.72)
    assert read(Found(two, text=TextReading("49", 0.95, line)), 0.5).confidence == pytest.approx(0.95)
    assert read(Found(two, text=TextReading("43", 0.7, line)), 0.5).text == "49"  # less sure than the readers
    number = read(Found(two, text=TextReading("493", 0.9, line)), 0.5)  # surer: its digits, on the detected boxes
    assert number.text == "493" and number.confidence == pytest.approx(0.9)
    assert np.array_equal(number.digits.boxes[:2], two.boxes) and number.digits.boxes[2][0] == pytest.approx(56)
    assert read(Found(two, text=TextReading("493", 0.9, line, min_score=0.95)), 0.5).text == "49"  # below its bar
    stack = read(Found(Detections(), text=TextReading("905", 0.99, (10, 0, 30, 90))), 0.5)  # taller than wide
    assert stack.text == "905" and np.allclose(stack.digits.boxes[:, 1], [0, 30, 60])  # top to bottom


def test_a_stack_or_a_letter_suffix_the_readers_misread_goes_to_the_recognizer_however_sure_they_are():
    assert [TextReading(d, 0.9, (0, 0, 60, 30), line=line).suffix for d, line in
            [("12", "12A"), ("502", "No 502c"), ("12", "12B"), ("12", "12AB"), ("172", "m 172"), ("12", "12 A"), ("8", "8a")]
            ] == ["A", "c", "", "", "", "", ""]
    row = dets([(10, 10, 30, 50, 0.99, 5), (32, 10, 52, 50, 0.99, 0), (54, 10, 74, 50, 0.99, 2), (76, 10, 96, 50, 0.99, 0)])
    line = (8, 8, 100, 52)
    assert read(Found(row, text=TextReading("502", 0.6, line, line="502C")), 0.5).text == "502"  # C read as 0
    assert read(Found(row, text=TextReading("502", 0.6, line, line="502B")), 0.5).text == "5020"  # B may be an 8
    assert read(Found(row, text=TextReading("502", 0.6, line, line="A502")), 0.5).text == "5020"  # not a suffix
    six = dets([(20, 40, 60, 100, 0.99, 6)])  # the readers read one "6" in a stack of three
    assert read(Found(six, text=TextReading("905", 0.8, (10, 0, 70, 200))), 0.5).text == "905"
    column = dets([(20, 0, 60, 60, 0.99, 9), (20, 65, 60, 125, 0.99, 0), (20, 130, 60, 190, 0.99, 6)])
    assert read(Found(column, text=TextReading("905", 0.8, (10, 0, 70, 200))), 0.5).text == "906"  # a column: surer stands
    assert read(Found(six, text=TextReading("905", 0.4, (10, 0, 70, 200))), 0.5).text == "6"  # below its bar
    assert read(Found(six, text=TextReading("905", 0.8, (10, 0, 70, 200), min_score=0.95, min_score_misread=0.5)), 0.5).text == "905"
    row = dets([(142, 25, 158, 93, 0.99, 1), (156, 26, 181, 92, 0.99, 5)])  # a row of two in a tall line box
    assert read(Found(row, text=TextReading("151", 0.9, (133, 17, 194, 131))), 0.5).text == "15"  # not a stack they misread


WALL = Path(__file__).parent / "fixtures" / "scenes" / "scene1.jpg"  # a Debian wallpaper with pasted patches


def photo(lines, size=(500, 375), colour=(120, 140, 110), wall: bool = False) -> Image.Image:
    """A plain 'wall' (or, with ``wall``, a corner of a real wallpaper) with ``lines`` of (text, (x, y),
    pixel size) drawn dark on it; "|" stacks a text's characters."""
    im = Image.open(WALL).convert("RGB").crop((0, 0, 1000, 750)).resize(size) if wall else Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(im)
    for text, (x, y), px in lines:
        font = ImageFont.load_default(size=px)
        chars = text[1:] if text.startswith("|") else [text]
        for k, c in enumerate(chars):
            draw.text((x, y + k * int(px * 1.2)), c, fill=(15, 15, 15), font=font)
    return im


@pytest.mark.slow
@needs_ppocr
def test_photos_drawn_here_are_read_as_drawn():
    from digit_demo.pipeline import Pipeline, PipelineConfig

    pipe = Pipeline(PipelineConfig(locator="ppocr"))
    cases = {"12": photo([("12A", (200, 150), 40)]),  # a letter suffix is not a digit
             "4702": photo([("4702", (200, 160), 15)]),  # digits 3% of a 500 px photo's height
             "318": photo([("318", (330, 300), 15)], wall=True),  # the same on a real wallpaper, beside its text
             "905": photo([("|905", (240, 60), 30)]),  # a vertical stack, top to bottom
             "27": photo([("Main Street 27", (100, 150), 30)])}  # a street name beside it
    readings = pipe.read(list(cases.values()))
    assert [n.text for n in readings.at()] == list(cases)
    small = readings[1]
    assert small.located and not small.regions[0].whole  # found as a region of the photo, not read whole
    x1, y1, x2, y2 = small.regions[0].box
    assert x1 >= 190 and x2 <= 260 and y1 >= 150 and y2 <= 185  # where it was drawn


def test_the_detector_looks_again_at_a_larger_size_only_where_a_large_photo_showed_no_digits():
    from digit_demo.ocr import TextFinder

    finder = TextFinder.__new__(TextFinder)  # the retry rule alone: no engine loaded
    finder.settings = TextSettings(det_side=640, retry_side=960)
    seen = {640: [TextLine((0, 0, 50, 20), "EXIT", 0.9)], 960: [TextLine((5, 5, 25, 40), "3", 0.8)]}
    calls = []
    finder._lines = lambda image, side: calls.append(side) or seen[side]
    assert [t.text for t in finder.lines(Image.new("RGB", (1024, 768)))] == ["3"] and calls == [640, 960]
    calls.clear()
    assert [t.text for t in finder.lines(Image.new("RGB", (600, 400)))] == ["EXIT"] and calls == [640]  # no larger
    seen[640] = [TextLine((0, 0, 50, 20), "No 12", 0.9)]
    calls.clear()
    assert [t.text for t in finder.lines(Image.new("RGB", (1024, 768)))] == ["No 12"] and calls == [640]  # digits found


@needs_ppocr
def test_ppocr_threads_sleep_between_calls_and_the_rebuilt_sessions_read_as_drawn():
    from digit_demo.ocr import TextFinder

    finder = TextFinder(threads=2)
    engine = finder._engine(finder.settings.det_side)
    for part in (engine.text_det, engine.text_rec):
        options = part.session.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.intra_op_num_threads == 2
    assert [t.digits for t in number_lines(finder.lines(photo([("4702", (200, 160), 15)])))] == ["4702"]


@pytest.mark.slow
@needs_ppocr
def test_where_ppocr_finds_no_digit_line_the_cnn_locator_looks():
    import json

    from digit_demo.pipeline import ModelCache, Pipeline, PipelineConfig

    scenes = Path(__file__).parent / "fixtures" / "scenes"
    truth = json.loads((scenes / "scenes.json").read_text())
    pipe = Pipeline(PipelineConfig(locator="ppocr"), cache=ModelCache())  # its own PP-OCR, changed below
    assert pipe.stages.fallback is not None
    pipe.locator.lines = lambda image: [TextLine((0, 0, 50, 20), "EXIT", 0.9)]  # PP-OCR sees no digits
    reading = pipe.read([scenes / "scene1.jpg"])[0]
    region = reading.regions[0]
    assert reading.located and not region.whole and region.text is None  # found by the CNN locator
    x1, y1, x2, y2 = truth["regions"]["1"][0]
    cx, cy = (region.box[0] + region.box[2]) / 2, (region.box[1] + region.box[3]) / 2
    assert x1 <= cx <= x2 and y1 <= cy <= y2  # where the number was pasted
    assert reading.number(pipe.threshold).text == truth["texts"]["1"][0]


@pytest.mark.slow
@needs_ppocr
def test_where_ppocr_is_unsure_of_every_digit_line_the_cnn_locators_regions_join_its_own():
    import json

    from digit_demo.pipeline import ModelCache, Pipeline, PipelineConfig

    scenes = Path(__file__).parent / "fixtures" / "scenes"
    truth = json.loads((scenes / "scenes.json").read_text())
    x1, y1, x2, y2 = truth["regions"]["1"][0]
    width, height = Image.open(scenes / "scene1.jpg").size
    # a patch of texture in the corner farthest from the number, boxed as a "1"
    fx = 0 if (x1 + x2) / 2 > width / 2 else width - 60
    fy = 0 if (y1 + y2) / 2 > height / 2 else height - 90
    texture = (fx, fy, fx + 60, fy + 90)
    pipe = Pipeline(PipelineConfig(locator="ppocr"), cache=ModelCache())  # its own PP-OCR, changed below
    bar = pipe.locator.settings.join_below
    for box, score, joins in ((texture, bar - 0.2, True), (texture, bar, False), ((x1, y1, x2, y2), bar - 0.2, False)):
        pipe.locator.lines = lambda image: [TextLine(box, "1", score)]
        reading = pipe.read([scenes / "scene1.jpg"])[0]
        assert reading.regions[0].text.digits == "1" and tuple(reading.regions[0].box) == box
        joined = reading.regions[1:]
        assert bool(joined) == joins, (box, score)
        if joins:  # the CNN locator found the pasted number, and it is read there
            assert all(r.text is None for r in joined)
            assert reading.number(pipe.threshold).text == truth["texts"]["1"][0]


class FortyNine:
    """A detect stage that finds "49" (digits 80 px tall, near the top left) in any image, each digit
    ``score`` sure, and keeps the size of every image it reads."""

    name, meta, reader = "m", {"threshold": 0.5}, None

    def __init__(self, score: float):
        self.score, self.seen = score, []

    def detect_tensors(self, tensors):
        self.seen += [tuple(t.shape[1:]) for t in tensors]
        return [Detections(np.array([[10, 10, 40, 90], [50, 12, 80, 92]], np.float32), np.full(2, self.score, np.float32),
                           np.array([4, 9])) for _ in tensors]


def test_a_sure_reading_that_fills_the_photo_stands_and_ppocr_looks_only_where_it_does_not():
    from digit_demo.ocr import TextFinder
    from digit_demo.pipeline import Pipeline, PipelineConfig, Stages

    def pipeline(score, lines):
        finder = TextFinder.__new__(TextFinder)  # PP-OCR's lines given by hand: no engine loaded
        finder.settings, finder.asked = TextSettings(settle=0.9, settle_share=0.3, settle_side=512), []
        finder.lines = lambda image: finder.asked.append(image.size) or lines
        member = FortyNine(score)
        return Pipeline(PipelineConfig(("m",), threshold=0.3), stages=Stages([member], locator=finder)), member, finder

    crop = Image.new("RGB", (100, 100))  # digits 80% of its height
    pipe, member, finder = pipeline(0.96, [TextLine((10, 10, 80, 92), "48", 0.99)])
    (reading,) = pipe.read([crop])
    assert reading.number(0.3).text == "49" and finder.asked == [] and member.seen == [(100, 100)]  # 0.96² ≥ 0.9
    # not sure enough: PP-OCR looks; its line fills the photo, so the first reading is kept, with PP-OCR's text
    pipe, member, finder = pipeline(0.9, [TextLine((10, 10, 80, 92), "48", 0.99)])  # 0.9² < 0.9
    (reading,) = pipe.read([crop])
    assert finder.asked == [(100, 100)] and member.seen == [(100, 100)]
    (region,) = reading.regions
    assert region.whole and region.text.digits == "48" and reading.number(0.3).text == "48"  # 0.99 sure, over 0.81
    # sure, but the digits fill 20% of the photo: PP-OCR looks, and its line's crop is read
    pipe, member, finder = pipeline(0.96, [TextLine((200, 150, 240, 170), "7", 0.8)])
    (reading,) = pipe.read([Image.new("RGB", (500, 400))])
    assert finder.asked == [(500, 400)] and member.seen == [(400, 500), (32, 60)]
    assert [r.crop for r in reading.regions] == [(190, 144, 250, 176)]  # padded by 0.5 / 0.3 of its 20 px height
    # its short side over settle_side (512): PP-OCR looks at once, and the readers read only its line's crop
    pipe, member, finder = pipeline(0.96, [TextLine((400, 300, 440, 320), "7", 0.8)])
    (reading,) = pipe.read([Image.new("RGB", (1000, 800))])
    assert finder.asked == [(1000, 800)] and member.seen == [(32, 60)]
    assert [r.crop for r in reading.regions] == [(390, 294, 450, 326)]


@pytest.mark.slow
@needs_ppocr
def test_the_default_reads_svhn_crops_at_least_as_well_as_the_readers_alone(fixture_gt, fixture_images):
    from digit_demo.data import gt_numbers
    from digit_demo.pipeline import Pipeline, PipelineConfig

    truth = gt_numbers(fixture_gt)
    paths = [fixture_images / im["file_name"] for im in fixture_gt["images"]]
    default, whole = Pipeline(), Pipeline(PipelineConfig(locator=None))
    assert default.config.locator == "ppocr" and all(default.reads_first(Image.open(p)) for p in paths)
    right = lambda pipe: [n.text == truth[im["id"]] for n, im in zip(pipe.read(paths).at(), fixture_gt["images"])]  # noqa: E731
    ours, alone = right(default), right(whole)
    assert sum(ours) >= sum(alone) and sum(ours) >= len(paths) // 2  # against the labels


def test_the_stage_settings_come_from_the_folders_sidecar_and_a_wrong_one_is_one_clear_error(tmp_path):
    import json

    from digit_demo.checkpoints import CheckpointError
    from digit_demo.ocr import text_settings, write_sidecar

    assert text_settings(tmp_path) == TextSettings()  # no sidecar: the defaults
    side = write_sidecar(tmp_path, TextSettings(settle=None, det_side=640, pad=(1.0, 0.5)), {"settle": "tuning split (t)"})
    got = text_settings(tmp_path)
    assert (got.settle, got.det_side, got.pad, got.min_score) == (None, 640, (1.0, 0.5), TextSettings().min_score)
    assert isinstance(got.det_side, int) and json.loads(side.read_text())["tuned"]["chosen_on"]["settle"] == "tuning split (t)"
    meta = json.loads(side.read_text())
    for bad, message in [({"det_side": 512.5}, "'det_side'] = 512.5 is not a whole number"),
                         ({"settle_bar": 0.9}, "has 'settle_bar', which a TextSettings does not have"),
                         ({"pad": [0.5]}, "does not hold 2 numbers")]:
        side.write_text(json.dumps({**meta, "tuned": {**meta["tuned"], **bad}}))
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
            text_settings(tmp_path)
    side.write_text(json.dumps({**meta, "architecture": "digit_reader_cnn"}))
    with pytest.raises(CheckpointError, match="not the 'ppocr_text_lines' stage"):
        text_settings(tmp_path)


def test_the_value_that_reads_most_wins_and_a_tie_goes_to_the_lowest_settle_or_the_highest_bar():
    from train.settle import choose

    assert choose([(0.7, 270), (0.8, 275), (0.85, 275), (0.9, 274), (None, 275)]) == 0.8
    assert choose([(0.7, 1), (0.9, 2), (None, 3)]) is None  # PP-OCR on every photo reads most
    assert choose([(0.8, 270), (0.85, 272), (0.9, 272), (0.95, 271)], lowest=False) == 0.9


@needs_ppocr
def test_the_default_pipeline_locates_with_its_checkpoint_folders_settings(tmp_path):
    import os
    import subprocess
    import sys

    from digit_demo.ocr import SIDECAR, write_sidecar

    from .conftest import ROOT

    for f in (ROOT / "checkpoints").glob("*.*"):  # the shipped folder, its PP-OCR settings changed
        if f.name != SIDECAR:
            (tmp_path / f.name).symlink_to(f)
    write_sidecar(tmp_path, TextSettings(settle=0.5, det_side=640))
    code = "from digit_demo.pipeline import Pipeline; s = Pipeline().locator.settings; print(s.settle, s.det_side)"
    env = {**os.environ, "DIGIT_DEMO_CHECKPOINTS": str(tmp_path), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0.5", "640"]
