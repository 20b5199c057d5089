"""Choosing a checkpoint's inference input size on validation images."""
import json
import shutil

from digit_demo.checkpoints import CHECKPOINT_DIR, load_checkpoint
from digit_demo.card import _input
from train.input_size import main

from .conftest import FIXTURES


def test_input_size_sweep_records_the_best_size_in_the_sidecar(tmp_path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(CHECKPOINT_DIR / f"resnet18_fpn{suffix}", tmp_path / f"r18{suffix}")
    before = json.loads((tmp_path / "r18.json").read_text())
    assert main(["--checkpoint", str(tmp_path / "r18.safetensors"), "--sizes", "32", "128", "--data", str(FIXTURES)]) == 0
    meta = json.loads((tmp_path / "r18.json").read_text())
    rows = {r["size"]: r for r in meta["input_size_sweep"]}
    assert set(rows) == {32, 128} and (rows[32]["max_size"], rows[128]["max_size"]) == (85, 341)  # 256 * size / 96
    chosen = max(rows.values(), key=lambda r: (round(r["accuracy"], 4), round(r["mAP"], 4)))
    assert meta["config"]["test_size"] == chosen["size"] == meta["input_size"]["test_size"]
    # the measured threshold and metrics are the release step's to write, not the size sweep's
    assert meta["metrics"] == before["metrics"] and meta["threshold"] == before["threshold"]
    assert rows[32]["accuracy"] < rows[128]["accuracy"]  # digits shrunk to a few pixels are not read
    model, _ = load_checkpoint(tmp_path / "r18.safetensors")
    assert model.transform.test_size == chosen["size"]
    assert not (tmp_path / "README.md").exists()
    assert "→" in _input(meta["config"])  # the card shows the chosen size
