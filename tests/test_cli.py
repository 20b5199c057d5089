"""End to end: ``python -m digit_demo`` on real fixture images with the shipped default checkpoint."""
import csv
import json
import subprocess
import sys

from .conftest import FIXTURES, ROOT


def cli(*args, cwd=ROOT, **env):
    return subprocess.run([sys.executable, "-m", "digit_demo", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(ROOT), **env}, timeout=300)


def test_predict_plain_form_writes_hw2_files(tmp_path, default_detector):
    from digit_demo.assemble import assemble

    r = cli("predict", FIXTURES / "valid", "--out", tmp_path / "out", "--annotate", "-q")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "out" / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image_id", "pred_label"] and len(rows) == 8
    images = sorted((FIXTURES / "valid").glob("*.png"))
    from digit_demo.card import best_threshold

    threshold = best_threshold(["resnet18_fpn"])
    expected = {int(p.stem): assemble(d, threshold).label for p, d in zip(images, default_detector(images))}
    assert {int(r["image_id"]): int(r["pred_label"]) for r in rows} == expected
    preds = json.loads((tmp_path / "out" / "pred.json").read_text())
    assert all(p["image_id"] in expected and 1 <= p["category_id"] <= 10 and len(p["bbox"]) == 4 for p in preds)
    assert len(list((tmp_path / "out" / "annotated").glob("*.png"))) == 8


def test_evaluate_sweep_and_score_files(tmp_path):
    gt = FIXTURES / "valid.json"
    r = cli("evaluate", "--gt", gt, "--images", FIXTURES / "valid", "-q", "-t", "0.5")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.splitlines()[0])
    assert m["model"] == "resnet18_fpn" and 0 <= m["mAP"] <= 1 and 0 <= m["accuracy"] <= 1
    r = cli("sweep", "--gt", gt, "--images", FIXTURES / "valid", "--out", tmp_path / "sw", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sw" / "sweep_resnet18_fpn.csv").read_text().startswith("threshold,mAP")
    cli("predict", FIXTURES / "valid", "--out", tmp_path / "p", "-q", "-t", "0.5")
    r = cli("evaluate", "--gt", gt, "--pred-json", tmp_path / "p" / "pred.json", "--pred-csv", tmp_path / "p" / "pred.csv")
    scored = json.loads(r.stdout)
    assert scored["accuracy"] == m["accuracy"] and abs(scored["mAP"] - m["mAP"]) < 0.02


def test_ensemble_sweep_reports_comparison(tmp_path):
    r = cli("sweep", "--gt", FIXTURES / "valid.json", "--images", FIXTURES / "valid", "-m", "resnet18_fpn",
            "-m", "resnet18_fpn", "--fusion", "nms", "--out", tmp_path / "sw", "-q")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert set(summary["ensemble_beats_best_member"]) == {"accuracy", "mAP"}


def test_ensemble_evaluate_scores_each_member_as_alone(tmp_path):
    from digit_demo.card import best_threshold

    args = ("evaluate", "--gt", FIXTURES / "valid.json", "--images", FIXTURES / "valid", "-q")
    r = cli(*args, "-m", "mobilenet_v3_fpn", "-m", "resnet18_fpn", "--fusion", "vote")
    assert r.returncode == 0, r.stderr
    rows = {m.pop("model"): m for m in map(json.loads, r.stdout.splitlines())}
    assert list(rows) == ["mobilenet_v3_fpn", "resnet18_fpn", "ensemble[vote](mobilenet_v3_fpn+resnet18_fpn)"]
    alone = json.loads(cli(*args, "-m", "resnet18_fpn").stdout)
    assert rows["resnet18_fpn"] == {k: v for k, v in alone.items() if k != "model"}  # its own threshold and numbers
    assert rows["mobilenet_v3_fpn"]["threshold"] == best_threshold(["mobilenet_v3_fpn"])
    assert rows["ensemble[vote](mobilenet_v3_fpn+resnet18_fpn)"]["threshold"] == best_threshold(
        ["mobilenet_v3_fpn", "resnet18_fpn"], "vote")


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    r = cli("predict", tmp_path / "missing.png")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    r = cli("predict", FIXTURES / "valid" / "172.png", "-m", "no_such_model", "--out", tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    r = cli("predict", bad, "--out", tmp_path / "o", "-q")
    assert r.returncode == 1 and "not a readable image" in r.stderr and "Traceback" not in r.stderr


def test_predict_in_float32_on_request(tmp_path):
    from digit_demo.assemble import assemble
    from digit_demo.card import best_threshold
    from digit_demo.detect import Detector

    images = sorted((FIXTURES / "valid").glob("*.png"))
    threshold = best_threshold(["resnet18_fpn"])
    expected = {int(p.stem): assemble(d, threshold).label for p, d in zip(images, Detector.load(precision="fp32")(images))}
    for flags, env in ((["--precision", "fp32"], {}), ([], {"DIGIT_DEMO_PRECISION": "fp32"})):
        r = cli("predict", FIXTURES / "valid", "--out", tmp_path / "o", "-q", *flags, **env)
        assert r.returncode == 0, r.stderr
        with open(tmp_path / "o" / "pred.csv") as f:
            assert {int(row["image_id"]): int(row["pred_label"]) for row in csv.DictReader(f)} == expected
    r = cli("predict", FIXTURES / "valid", "--out", tmp_path / "o", "-q", DIGIT_DEMO_PRECISION="half")
    assert r.returncode != 0 and "unknown precision 'half'" in r.stderr and "Traceback" not in r.stderr


def test_models_lists_the_default():
    r = cli("models")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert any(x["name"] == "resnet18_fpn" and x["default"] for x in rows)
    assert any(x["name"] == "digit_reader" and x["role"] == "second-stage digit reader" for x in rows)
    roles = {x["name"]: x["role"] for x in rows if "role" in x}
    assert roles["number_reader"] == "whole-number reader" and roles["number_proposer"] == "whole-number reader's proposer"


def test_predict_with_and_without_the_reader(tmp_path):
    from digit_demo.assemble import assemble
    from digit_demo.card import best_threshold
    from digit_demo.detect import Detector

    image = FIXTURES / "valid" / "10848.png"
    for flag, reader in (("--reader", "digit_reader"), ("--no-reader", None)):
        out = tmp_path / flag
        args = ("predict", image, "--out", out, "-q") + ((flag, reader) if reader else (flag,))
        assert cli(*args).returncode == 0
        expected = assemble(Detector.load(reader=reader)([image])[0], best_threshold(reader=reader is not None))
        assert (out / "pred.csv").read_text().splitlines()[1] == f"10848,{expected.label}"


def test_predict_multi_scale(tmp_path, default_detector):
    from digit_demo.assemble import assemble
    from digit_demo.card import best_threshold
    from digit_demo.detect import Detector

    r = cli("predict", FIXTURES / "valid", "--out", tmp_path, "--multi-scale", "-q")
    assert r.returncode == 0, r.stderr
    both = Detector(default_detector.model, default_detector.meta, reader=default_detector.reader, multi_scale=True,
                    number_reader=default_detector.number_reader)
    threshold = best_threshold(multi_scale=True)
    images = sorted((FIXTURES / "valid").glob("*.png"))
    expected = {int(p.stem): assemble(d, threshold).label for p, d in zip(images, both(images))}
    with open(tmp_path / "pred.csv") as f:
        assert {int(r["image_id"]): int(r["pred_label"]) for r in csv.DictReader(f)} == expected


def test_predict_without_the_proposer(tmp_path):
    from digit_demo.assemble import assemble
    from digit_demo.card import best_threshold
    from digit_demo.detect import load_detector

    r = cli("predict", FIXTURES / "valid", "--out", tmp_path, "--no-proposer", "-q")
    assert r.returncode == 0, r.stderr
    det = load_detector(["resnet18_fpn"], proposer=None)
    assert det.number_reader is not None and det.number_reader.proposer is None
    images = sorted((FIXTURES / "valid").glob("*.png"))
    expected = {int(p.stem): assemble(d, best_threshold()).label for p, d in zip(images, det(images))}
    with open(tmp_path / "pred.csv") as f:
        assert {int(r["image_id"]): int(r["pred_label"]) for r in csv.DictReader(f)} == expected
