"""The Gradio app, launched on localhost: driven through gradio_client and a real browser."""
import csv
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import FIXTURES, ROOT, measured_threshold, raw_detections

pytestmark = pytest.mark.slow

IMAGES = sorted((FIXTURES / "valid").glob("*.png"))


def truth() -> dict[int, str]:
    """The fixtures' numbers as their labels give them ("-1" for none)."""
    from digit_demo.data import gt_numbers, load_coco

    return {i: t or "-1" for i, t in gt_numbers(load_coco(FIXTURES / "valid.json")).items()}


BROWSER = importlib.util.find_spec("playwright") is not None and shutil.which("chromium") is not None
needs_browser = pytest.mark.skipif(not BROWSER, reason="needs playwright and Debian chromium (make browser)")


def page_finder() -> str:
    """What the page finds numbers with by default (app.FINDER, without importing the app)."""
    from digit_demo.ocr import available

    return "ppocr" if available() else "locator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "DIGIT_DEMO_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read())
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app did not start")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def open_page(playwright, url: str):
    """Debian's chromium on the app's page (Playwright never downloads a browser here)."""
    browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    return browser, page


def wait_for_reading(page) -> None:
    """Until the page shows a number: neither the empty state nor Gradio's progress (nor a page still
    rendering the number's element, as a loaded machine shows it)."""
    page.wait_for_function("() => { const el = document.querySelector('#number'); if (!el) return false;"
                           " const t = el.innerText; return !t.includes('no image yet') && !t.includes('processing'); }",
                           timeout=60000)


def read_all(client, paths, models=("resnet18_fpn",), fusion="vote", threshold=0.5, use_reader=True, multi_scale=False,
             finder="locator"):
    """The app's reading of ``paths``; with the CNN locator unless ``finder`` says otherwise, as the
    library's default pipeline reads (the page itself starts on PP-OCR's text lines)."""
    from gradio_client import handle_file

    return client.predict([handle_file(str(p)) for p in paths], None, list(models), fusion, threshold, use_reader,
                          multi_scale, finder, api_name="/read_numbers")


def test_every_event_has_an_api_name(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/read_numbers", "/rethreshold", "/downloads", "/model_settings", "/reader_settings", "/explorer"} <= set(api)


def test_read_rethreshold_and_download(client):
    from digit_demo.judge import read

    out = read_all(client, IMAGES, threshold=0.5)
    image, html, digits, gallery, table, files, message, whole, found = out  # gr.State is not part of the API
    rows = table["data"]
    assert [r[0] for r in rows] == [p.name for p in IMAGES]
    # against the labels: at least 5 of the 8 numbers (the default reads 0.857 of valid; these are harder)
    labelled = truth()
    assert sum(r[2] == labelled[int(Path(r[0]).stem)] for r in rows) >= 5, (rows, labelled)
    # the app reads the same numbers as the library at that threshold
    raw = raw_detections(None, IMAGES)
    assert [r[2] for r in rows] == [read(d, 0.5).text or "-1" for d in raw]
    assert len(gallery) == 8 and Path(image).is_file()
    assert files is None  # written only when asked for, at the threshold shown
    by_name = {Path(f).name: f for f in client.predict(0.5, api_name="/downloads")}
    assert set(by_name) == {"pred.json", "pred.csv", "annotated.zip"}
    with open(by_name["pred.csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0]) == ["image_id", "pred_label"]
    assert {int(r["image_id"]): r["pred_label"] for r in csv_rows} == {int(Path(r[0]).stem): r[2] for r in rows}
    preds = json.loads(Path(by_name["pred.json"]).read_text())
    assert all(set(p) == {"image_id", "bbox", "score", "category_id"} and p["score"] >= 0.5 for p in preds)

    # the slider re-filters cached detections: a high threshold keeps fewer digits
    _, _, digits_hi, _, table_hi, files_hi, _, _, _ = client.predict(0.95, api_name="/rethreshold")
    expected = [read(d, 0.95).text or "-1" for d in raw]
    assert [r[2] for r in table_hi["data"]] == expected
    assert len(digits_hi["data"]) <= len(digits["data"])


def test_ensemble_and_bad_uploads(client, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(IMAGES[0].read_bytes()[:200])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    models = [n for n in ("resnet18_fpn", "mobilenet_v3_fpn", "resnet34_fpn") if (ROOT / "checkpoints" / f"{n}.json").exists()]
    out = read_all(client, [IMAGES[0], bad, text], models=models, fusion="nms", threshold=0.5)
    table, message = out[4], out[6]
    assert [r[0] for r in table["data"]] == [IMAGES[0].name]
    assert "broken.png: corrupt or truncated" in message and "notes.txt: not a readable image" in message
    assert "Traceback" not in message


def test_threshold_default_comes_from_the_sweep(client):
    for use_reader, name in ((True, "resnet18_fpn"), (False, "resnet18_fpn (detector only)")):
        slider, fig, rows = client.predict(["resnet18_fpn"], "wbf", use_reader, False, api_name="/model_settings")
        expected = measured_threshold(name)
        assert slider["value"] == pytest.approx(expected) if isinstance(slider, dict) else slider == pytest.approx(expected)
        assert rows["data"][0][0] == name
    # an ensemble's sweep is found whatever order its members are named in
    measured = measured_threshold("ensemble[vote](mobilenet_v3_fpn+resnet18_fpn)")
    assert measured != 0.5
    for models in (["resnet18_fpn", "mobilenet_v3_fpn"], ["mobilenet_v3_fpn", "resnet18_fpn"]):
        slider = client.predict(models, "vote", True, False, api_name="/model_settings")[0]
        assert slider["value"] == pytest.approx(measured)


def test_reader_checkbox_switches_the_second_stages(client):
    from digit_demo.judge import read
    from digit_demo.pipeline import PipelineConfig

    for use_reader, config in ((True, None), (False, PipelineConfig(digit_reader=None))):  # off: both readers off
        table = read_all(client, IMAGES[:4], threshold=0.4, use_reader=use_reader)[4]
        assert [r[2] for r in table["data"]] == [read(d, 0.4).text or "-1" for d in raw_detections(config, IMAGES[:4])]


def test_multi_scale_checkbox_reads_at_two_sizes(client):
    from digit_demo.judge import read
    from digit_demo.checkpoints import read_sidecar, resolve
    from digit_demo.pipeline import PipelineConfig

    table = read_all(client, IMAGES, threshold=0.4, multi_scale=True)[4]
    both = raw_detections(PipelineConfig(multi_scale=True), IMAGES)
    assert [r[2] for r in table["data"]] == [read(d, 0.4).text or "-1" for d in both]
    slider, _, rows = client.predict(["resnet18_fpn"], "wbf", True, True, api_name="/model_settings")
    assert rows["data"][0][0] == "resnet18_fpn (multi-scale)"
    measured = read_sidecar(resolve("resnet18_fpn"))["metrics"]["valid_multi_scale"]["threshold"]  # the two-size sweep's best
    assert slider["value"] == measured_threshold("resnet18_fpn (multi-scale)") == measured


def test_odd_uploads_get_a_readable_message_and_the_rest_are_read(client, tmp_path):
    import numpy as np
    from PIL import Image

    strip, tall = tmp_path / "strip.png", tmp_path / "tall.png"
    Image.fromarray(np.full((8, 20000, 3), 200, np.uint8)).save(strip)
    Image.fromarray(np.full((20000, 8, 3), 200, np.uint8)).save(tall)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + b"\0" * 50)
    out = read_all(client, [strip, IMAGES[0], broken, tall], threshold=0.5)
    table, message = out[4], out[6]
    assert [r[0] for r in table["data"]] == ["strip.png", IMAGES[0].name, "tall.png"]  # read, not rejected
    assert "broken.jpg" in message and "Traceback" not in message and message.count("⚠️") == 1


def test_model_labels_follow_the_reader_checkbox(client):
    from digit_demo.checkpoints import CHECKPOINT_DIR

    meta = json.loads((CHECKPOINT_DIR / "resnet18_fpn.json").read_text())["metrics"]
    for use_reader, key in ((True, "valid"), (False, "valid_detector_only")):
        update = client.predict(use_reader, api_name="/relabel_models")
        labels = dict((v, k) for k, v in update["choices"])
        assert f"acc {meta[key]['accuracy']:.2f}" in labels["resnet18_fpn"]
    assert meta["valid"]["accuracy"] != meta["valid_detector_only"]["accuracy"]


@needs_browser
def test_real_browser_upload_slider_and_number(server, tmp_path):
    from playwright.sync_api import sync_playwright

    from digit_demo.judge import read

    from digit_demo.pipeline import PipelineConfig

    photo = FIXTURES / "valid" / "1108.png"  # labelled 35
    raw = raw_detections(PipelineConfig(locator=page_finder()), [photo])[0]  # as the page reads by default
    with sync_playwright() as p:
        browser, page = open_page(p, server)
        page.locator("input[type=file]").first.set_input_files(str(photo))
        number = page.locator("#number")
        wait_for_reading(page)
        shown = number.inner_text().split("\n")[0].strip()
        slider_value = float(page.locator("#threshold input[type=number]").input_value())
        assert shown == truth()[1108] == (read(raw, slider_value).text or "?")
        (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "tests" / "artifacts" / "browser_read.png"), full_page=True)
        # move the slider to the top: the number is re-assembled from cached detections
        box = page.locator("#threshold input[type=number]")
        box.fill("0.95")
        box.press("Enter")
        expected = read(raw, 0.95).text or "?"
        page.wait_for_function(f"() => document.querySelector('#number').innerText.split('\\n')[0].trim() === '{expected}'",
                               timeout=30000)
        page.screenshot(path=str(ROOT / "tests" / "artifacts" / "browser_slider.png"), full_page=True)
        browser.close()


SCENES = FIXTURES / "scenes"
LOCATOR = (ROOT / "checkpoints" / "locator.safetensors").is_file()


@pytest.mark.skipif(not LOCATOR, reason="no locator shipped")
def test_a_whole_photo_returns_its_regions_and_number(client):
    from digit_demo.pipeline import Pipeline

    truth = json.loads((SCENES / "scenes.json").read_text())
    pipe = Pipeline()
    paths = [SCENES / im["file_name"] for im in truth["images"]]
    out = read_all(client, paths, threshold=0.35)
    image, html, digits, gallery, table, files, message, whole, found = out
    expected = [r.number(0.35).text or "-1" for r in pipe.read(paths)]  # the library, at the same threshold
    assert [r[2] for r in table["data"]] == expected
    texts = {im["file_name"]: truth["texts"][str(im["id"])] for im in truth["images"]}  # where each number was pasted
    assert all(r[2] in texts[r[0]] for r in table["data"]), (table["data"], texts)
    rows = found["data"]
    assert {r[0] for r in rows} == {p.name for p in paths}
    two = [r for r in rows if r[0] == "scene3.jpg"]
    assert len(two) >= 2 and all(isinstance(r[3], list) and len(r[3]) == 4 for r in two)  # each number's region
    assert Path(_file(whole)).is_file()  # the photo with the regions marked
    assert max(_image_size(_file(image))) >= 320  # the first photo's region, zoomed in


def _file(value) -> str:
    """The file path in what the API returns for an image (a path, or an update holding one)."""
    while isinstance(value, dict):
        value = value.get("value") or value.get("path")
    return value


def _image_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


@needs_browser
@pytest.mark.skipif(not LOCATOR, reason="no locator shipped")
def test_real_browser_reads_a_whole_photo(server):
    from playwright.sync_api import sync_playwright

    from digit_demo.pipeline import Pipeline

    from digit_demo.pipeline import PipelineConfig

    photo = SCENES / "scene1.jpg"
    pipe = Pipeline(PipelineConfig(locator=page_finder()))  # as the page reads by default
    with sync_playwright() as p:
        browser, page = open_page(p, server)
        page.locator("input[type=file]").first.set_input_files(str(photo))
        wait_for_reading(page)
        shown = page.locator("#number").inner_text().split("\n")[0].strip()
        slider_value = float(page.locator("#threshold input[type=number]").input_value())
        assert shown == (pipe.read([photo])[0].number(slider_value).text or "?")
        truth = json.loads((SCENES / "scenes.json").read_text())
        assert shown in truth["texts"][str(next(im["id"] for im in truth["images"] if im["file_name"] == photo.name))]
        (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "tests" / "artifacts" / "browser_scene.png"), full_page=True)
        browser.close()


def test_the_readmes_api_example_runs_against_the_served_app(server):
    from .test_readme import python_block, run_python

    code = python_block("API")
    assert "http://127.0.0.1:7860/" in code
    out = run_python(code.replace("http://127.0.0.1:7860/", server))
    # examples/10963.png shows 23 (by eye): file, image id, number, confidence
    name, image_id, number, confidence = eval(out.splitlines()[-1])[0]  # the printed table (after the client's own line)
    assert (name, image_id, number) == ("10963.png", 10963, "23") and 0 < confidence <= 1


@pytest.mark.skipif(page_finder() != "ppocr", reason="rapidocr / onnxruntime not installed")
def test_a_small_number_in_a_photo_comes_back_with_its_region(client, tmp_path):
    from .test_ocr import photo

    path = tmp_path / "wall.png"
    photo([("Main Street", (60, 60), 22), ("4702", (300, 250), 14)]).save(path)  # digits under 4% of 375 px
    out = read_all(client, [path], finder="ppocr", threshold=0.35)
    table, whole, found = out[4], out[7], out[8]
    assert [r[2] for r in table["data"]] == ["4702"]
    (row,) = [r for r in found["data"] if r[1] == "4702"]
    x1, y1, x2, y2 = row[3]  # its region, in the photo's pixels, where it was drawn
    assert 280 <= x1 and x2 <= 360 and 240 <= y1 and y2 <= 275
    assert Path(_file(whole)).is_file()  # the whole photo with the number marked


@pytest.mark.parametrize("env, threads, concurrency", [
    ({}, 1, len(os.sched_getaffinity(0))),  # the app's policy: one single-threaded reading per core
    ({"DIGIT_DEMO_THREADS": "2", "DIGIT_DEMO_CONCURRENCY": "3"}, 2, 3),
])
def test_serving_policy_reads_one_reading_per_core_on_one_thread(env, threads, concurrency):
    code = ("import torch, app; "
            "print(torch.get_num_threads(), app.CONCURRENCY, app.demo._queue.default_concurrency_limit)")
    base = {k: v for k, v in os.environ.items() if k not in ("DIGIT_DEMO_THREADS", "DIGIT_DEMO_CONCURRENCY")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**base, **env, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-3:] == [str(threads), str(concurrency), str(concurrency)]


def test_the_queue_summarises_events_for_its_monitoring_page_once_in_a_thousand():
    # Gradio's queue summarises every event recorded after each one unless told otherwise: with the app's
    # queue, 999 new events leave the (empty) summary as it was and the 1,000th recomputes it
    code = ("import app; q = app.demo._queue; "
            "rec = [{'time': 0.0, 'status': 'success', 'process_time': 0.1, 'function': 'read_numbers', 'session_hash': 'a'}]; "
            "q.events_recorded = 999; print(sorted(q.compute_analytics_summary(rec)['functions'])); "
            "q.events_recorded = 1000; print(sorted(q.compute_analytics_summary(rec)['functions']))")
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_ANALYTICS_CACHE")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**base, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-3:-1] == ["[]", "['read_numbers']"]


@pytest.mark.parametrize("name, value", [("DIGIT_DEMO_CONCURRENCY", "two"), ("DIGIT_DEMO_QUEUE", "0"),
                                         ("DIGIT_DEMO_THREADS", "+2"), ("DIGIT_DEMO_THREADS", "-1")])
def test_a_wrong_serving_setting_is_one_clear_line(name, value):
    env = {**os.environ, name: value, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", "import app"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {name}={value!r} is not a positive whole number"]
