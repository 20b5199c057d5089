"""The Gradio app, launched on localhost: driven through gradio_client and a real browser."""
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import FIXTURES, ROOT

IMAGES = sorted((FIXTURES / "valid").glob("*.png"))


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


def read_all(client, paths, models=("resnet18_fpn",), fusion="vote", threshold=0.5, use_reader=True, multi_scale=False):
    from gradio_client import handle_file

    return client.predict([handle_file(str(p)) for p in paths], None, list(models), fusion, threshold, use_reader,
                          multi_scale, api_name="/read_numbers")


def test_every_event_has_an_api_name(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/read_numbers", "/rethreshold", "/model_settings", "/reader_settings", "/explorer"} <= set(api)


def test_read_rethreshold_and_download(client, default_detector):
    from digit_demo.assemble import assemble

    out = read_all(client, IMAGES[:3], threshold=0.5)
    image, html, digits, gallery, table, files, message = out  # gr.State is not part of the API
    rows = table["data"]
    assert [r[0] for r in rows] == [p.name for p in IMAGES[:3]]
    # the app reads the same numbers as the library at that threshold
    raw = default_detector(IMAGES[:3])
    assert [r[2] for r in rows] == [assemble(d, 0.5).text or "-1" for d in raw]
    assert len(gallery) == 3 and Path(image).is_file()
    by_name = {Path(f).name: f for f in files}
    assert set(by_name) == {"pred.json", "pred.csv", "annotated.zip"}
    with open(by_name["pred.csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0]) == ["image_id", "pred_label"]
    assert {int(r["image_id"]) for r in csv_rows} == {int(p.stem) for p in IMAGES[:3]}
    preds = json.loads(Path(by_name["pred.json"]).read_text())
    assert all(set(p) == {"image_id", "bbox", "score", "category_id"} and p["score"] >= 0.5 for p in preds)

    # the slider re-filters cached detections: a high threshold keeps fewer digits
    _, _, digits_hi, _, table_hi, files_hi, _ = client.predict(0.95, api_name="/rethreshold")
    expected = [assemble(d, 0.95).text or "-1" for d in raw]
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
    from digit_demo.card import best_threshold

    for use_reader, name in ((True, "resnet18_fpn"), (False, "resnet18_fpn (detector only)")):
        slider, fig, rows = client.predict(["resnet18_fpn"], "wbf", use_reader, False, api_name="/model_settings")
        expected = best_threshold(["resnet18_fpn"], reader=use_reader)
        assert slider["value"] == pytest.approx(expected) if isinstance(slider, dict) else slider == pytest.approx(expected)
        assert rows["data"][0][0] == name
    # an ensemble's sweep is found whatever order its members are named in
    from digit_demo.card import sweep_curves
    from digit_demo.evaluation import best

    measured = best(sweep_curves()["ensemble[vote](mobilenet_v3_fpn+resnet18_fpn)"]).threshold
    assert best_threshold(["resnet18_fpn", "mobilenet_v3_fpn"], "vote") == measured != 0.5
    assert best_threshold(["mobilenet_v3_fpn", "resnet18_fpn"], "vote") == measured


def test_reader_checkbox_switches_the_second_stages(client, default_detector):
    from digit_demo.assemble import assemble
    from digit_demo.detect import Detector

    plain = Detector.load(reader=None, number_reader=None)  # the checkbox turns off both readers
    for use_reader, det in ((True, default_detector), (False, plain)):
        table = read_all(client, IMAGES[:4], threshold=0.4, use_reader=use_reader)[4]
        assert [r[2] for r in table["data"]] == [assemble(d, 0.4).text or "-1" for d in det(IMAGES[:4])]


def test_multi_scale_checkbox_reads_at_two_sizes(client, default_detector):
    from digit_demo.assemble import assemble
    from digit_demo.card import best_threshold
    from digit_demo.checkpoints import read_sidecar, resolve
    from digit_demo.detect import Detector

    both = Detector(default_detector.model, default_detector.meta, reader=default_detector.reader, multi_scale=True,
                    number_reader=default_detector.number_reader)
    table = read_all(client, IMAGES, threshold=0.4, multi_scale=True)[4]
    assert [r[2] for r in table["data"]] == [assemble(d, 0.4).text or "-1" for d in both(IMAGES)]
    slider, _, rows = client.predict(["resnet18_fpn"], "wbf", True, True, api_name="/model_settings")
    assert rows["data"][0][0] == "resnet18_fpn (multi-scale)"
    measured = read_sidecar(resolve("resnet18_fpn"))["metrics"]["valid_multi_scale"]["threshold"]  # the two-size sweep's best
    assert slider["value"] == best_threshold(["resnet18_fpn"], multi_scale=True) == measured


def test_model_labels_follow_the_reader_checkbox(client):
    from digit_demo.checkpoints import CHECKPOINT_DIR

    meta = json.loads((CHECKPOINT_DIR / "resnet18_fpn.json").read_text())["metrics"]
    for use_reader, key in ((True, "valid"), (False, "valid_detector_only")):
        update = client.predict(use_reader, api_name="/relabel_models")
        labels = dict((v, k) for k, v in update["choices"])
        assert f"acc {meta[key]['accuracy']:.2f}" in labels["resnet18_fpn"]
    assert meta["valid"]["accuracy"] != meta["valid_detector_only"]["accuracy"]


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian chromium not installed (make browser)")
def test_real_browser_upload_slider_and_number(server, tmp_path):
    from playwright.sync_api import sync_playwright

    from digit_demo.assemble import assemble
    from digit_demo.detect import Detector

    det = Detector.load()
    raw = det([IMAGES[0]])[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server)
        page.locator("input[type=file]").first.set_input_files(str(IMAGES[0]))
        number = page.locator("#number")
        page.wait_for_function("() => !document.querySelector('#number').innerText.includes('no image yet')", timeout=60000)
        shown = number.inner_text().split("\n")[0].strip()
        slider_value = float(page.locator("#threshold input[type=number]").input_value())
        assert shown == (assemble(raw, slider_value).text or "?")
        (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "tests" / "artifacts" / "browser_read.png"), full_page=True)
        # move the slider to the top: the number is re-assembled from cached detections
        box = page.locator("#threshold input[type=number]")
        box.fill("0.95")
        box.press("Enter")
        expected = assemble(raw, 0.95).text or "?"
        page.wait_for_function(f"() => document.querySelector('#number').innerText.split('\\n')[0].trim() === '{expected}'",
                               timeout=30000)
        page.screenshot(path=str(ROOT / "tests" / "artifacts" / "browser_slider.png"), full_page=True)
        browser.close()
