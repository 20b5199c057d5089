import json

import pytest
import torch

from digit_demo.checkpoints import CheckpointError, load_checkpoint, read_sidecar, resolve, save_checkpoint
from digit_demo.models import ARCHITECTURES, build_model, default_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(default_config("fasterrcnn_resnet18_fpn", min_size=96, max_size=240))
    path = save_checkpoint(model, tmp_path_factory.mktemp("ck") / "tiny", {"metrics": {"valid": {"accuracy": 0.5}}})
    return model, path


def test_every_architecture_builds_offline_with_11_classes():
    for name in ARCHITECTURES:
        m = build_model(name)
        assert m.roi_heads.box_predictor.cls_score.out_features == 11
        assert m.transform.min_size[-1] == default_config(name).min_size


def test_round_trip_is_fp16_weights_run_in_fp32(saved):
    model, path = saved
    meta = read_sidecar(path)
    assert meta["architecture"] == "fasterrcnn_resnet18_fpn" and meta["weights_dtype"] == "float16"
    assert meta["normalisation"]["mean"] == [0.485, 0.456, 0.406] and meta["classes"]["1"] == "0"
    assert meta["input_size"] == {"min_size": 96, "max_size": 240, "test_size": None, "test_max_size": None}
    loaded, meta2 = load_checkpoint(path)
    assert next(loaded.parameters()).dtype == torch.float32 and not loaded.training
    for k, v in model.state_dict().items():
        expected = v.half().float() if v.is_floating_point() else v
        torch.testing.assert_close(loaded.state_dict()[k], expected)
    assert loaded.transform.min_size == (96,) and meta2["metrics"]["valid"]["accuracy"] == 0.5


def test_wrong_architecture_is_named(saved, tmp_path):
    _, path = saved
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["architecture"] = "fasterrcnn_mobilenet_v3_large_fpn"
    meta["config"] = default_config("fasterrcnn_mobilenet_v3_large_fpn").to_dict()
    (tmp_path / "liar.json").write_text(json.dumps(meta))
    (tmp_path / "liar.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="do not fit architecture 'fasterrcnn_mobilenet_v3_large_fpn'.*missing"):
        load_checkpoint(tmp_path / "liar.safetensors")


def test_unknown_architecture_corrupt_file_missing_sidecar(saved, tmp_path):
    _, path = saved
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"]["architecture"] = "yolo"
    (tmp_path / "odd.json").write_text(json.dumps(meta))
    (tmp_path / "odd.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="unknown architecture 'yolo'"):
        load_checkpoint(tmp_path / "odd")
    (tmp_path / "bad.json").write_text(path.with_suffix(".json").read_text())
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")
    (tmp_path / "lonely.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="missing sidecar"):
        load_checkpoint(tmp_path / "lonely.safetensors")


def test_not_found_offline_says_how_to_download(monkeypatch):
    monkeypatch.delenv("DIGIT_DEMO_HUB_REPO", raising=False)
    with pytest.raises(CheckpointError, match="not found.*DIGIT_DEMO_HUB_REPO"):
        resolve("no_such_model")


def test_hub_download_failure_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("DIGIT_DEMO_HUB_REPO", "someone/digits")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not found"):
        resolve("no_such_model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub

    def fail(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(CheckpointError, match="download from someone/digits failed"):
        resolve("no_such_model")


def test_test_size_sets_the_inference_input_only_and_round_trips(tmp_path):
    from digit_demo.models import set_test_size

    model = build_model(default_config("fasterrcnn_resnet18_fpn", min_size=(80, 96), max_size=240))
    image = torch.rand(3, 60, 150)
    assert model.eval().transform([image])[0].image_sizes == [(96, 240)]
    set_test_size(model, 128, 320)
    assert model.transform([image])[0].image_sizes == [(128, 320)]
    model.train()
    assert model.transform([image])[0].image_sizes[0][0] in (80, 96)  # training still samples its own sizes
    path = save_checkpoint(model, tmp_path / "big", {})
    loaded, meta = load_checkpoint(path)
    assert meta["input_size"]["test_size"] == 128 and loaded.transform([image])[0].image_sizes == [(128, 320)]


def test_card_lists_each_training_stage_and_where_it_ran():
    from digit_demo.card import _epochs, _stages, training_summary

    cpu = {"training": {"epochs_run": 5, "device": "cpu", "images_per_s": 8.0, "train_seconds": 3600}, "recipe": {}}
    old = {"training": {"epochs_run": 3}, "device_name": "cpu", "recipe": {}}  # logged neither time nor device
    gpu = {"training": {"epochs_run": 4, "device": "NVIDIA H200", "images_per_s": 150.0, "train_seconds": 200},
           "recipe": {"init_from": {**cpu, "recipe": {"init_from": old}}}}
    assert _epochs(gpu) == "3 + 5 + 4"
    assert training_summary(gpu) == "cpu 8 ep, ≥60 min, 8 img/s; NVIDIA H200 4 ep, 3 min, 150 img/s"
    gpu["recipe"].update(batch_size=16, lr=0.01, lr_schedule="cosine", config="train/configs/x.json")
    gpu["metrics"] = {"valid": {"accuracy": 0.7, "mAP": 0.36}}
    lines = _stages(gpu).splitlines()
    assert len(lines) == 3 and lines[0].startswith("  1. 3 epochs on cpu")
    assert lines[2] == ("  3. 4 epochs on NVIDIA H200: batch 16, lr 0.01 cosine, `train/configs/x.json`; "
                        "valid accuracy 0.700, mAP 0.360 (detector alone)")
    # once benchmark.py has measured it with the digit reader, the stage still shows the detector alone
    gpu["metrics"] = {"valid": {"accuracy": 0.77, "mAP": 0.37}, "valid_detector_only": {"accuracy": 0.7, "mAP": 0.36}}
    assert _stages(gpu).splitlines()[2].endswith("valid accuracy 0.700, mAP 0.360 (detector alone)")
    # a reproduced stage chose its epochs on the tuning split: its line says so, whatever valid reports later
    gpu["metrics"] = {"valid": {"accuracy": 0.8, "mAP": 0.4}, "tune": {"accuracy": 0.6, "mAP": 0.3}}
    assert _stages(gpu).splitlines()[2].endswith("tune accuracy 0.600, mAP 0.300 (detector alone)")


def test_reader_cards_name_the_split_their_trainer_validated_on(tmp_path):
    import shutil

    from digit_demo.card import _number_reader_section, _reader_section

    for name in ("digit_reader", "number_reader"):
        for suffix in (".json", ".safetensors"):
            shutil.copy(f"checkpoints/{name}{suffix}", tmp_path / f"{name}{suffix}")
    shipped = _reader_section(tmp_path) + _number_reader_section(tmp_path)
    assert "chosen on `valid`" in shipped and "tuning split" not in shipped  # the shipped readers: chosen on valid
    for name in ("digit_reader", "number_reader"):
        side = tmp_path / f"{name}.json"
        meta = json.loads(side.read_text())
        meta["data"]["valid"] = "runs/splits/tune.json"
        side.write_text(json.dumps(meta))
    text = _reader_section(tmp_path) + _number_reader_section(tmp_path)
    assert "`valid`" not in text
    assert text.count("the tuning split (`tune.json`)") == 4  # validation, verify sweep, box head, number reader

