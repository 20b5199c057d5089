"""Short real training runs on the fixture images."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from digit_demo.card import write_model_card
from digit_demo.checkpoints import load_checkpoint
from digit_demo.detect import Detector
from digit_demo.data import load_coco
from train import engine
from train.cli import main, parse_args, recipe

from .conftest import FIXTURES

pytestmark = pytest.mark.slow


def card(folder: Path) -> str:
    """The model card the release step would write for ``folder`` (training writes none itself)."""
    assert not (folder / "README.md").exists()
    text = write_model_card(folder).read_text()
    (folder / "README.md").unlink()
    return text


def run(tmp_path, *extra):
    out = extra[extra.index("--out-dir") + 1] if "--out-dir" in extra else str(tmp_path / "run")
    args = ["--data", str(FIXTURES), "--train-json", "valid.json", "--train-images", "valid", "--val-json", "valid.json",
            "--out-dir", out, "--export-dir", str(tmp_path / "ck"), "--quiet", "--augment", "none",
            "--batch-size", "4", "--lr", "0.01", "--lr-schedule", "cosine", "--min-size", "96", "--max-size", "240", *extra]
    assert main(args) == 0
    with (Path(out) / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_short_run_lowers_loss_and_exports_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    log = run(tmp_path, "--model", "fasterrcnn_resnet18_fpn", "--name", "tiny", "--epochs", "4")
    losses = [float(r["loss"]) for r in log]
    assert len(log) == 4 and losses[-1] < losses[0] * 0.8
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    model, meta = load_checkpoint(tmp_path / "ck" / "tiny")
    assert meta["recipe"]["lr"] == 0.01 and meta["data"]["train_images"] == 8
    text = card(tmp_path / "ck")  # the best epoch is exported: it may come before the last
    assert meta["training"]["device"] == "cpu" and f"| cpu {meta['training']['epochs_run']} ep, " in text
    ips = [(float(r["images_per_s"]), float(r["seconds"])) for r in log]
    assert math.isclose(engine.mean_throughput(tmp_path / "run" / "log.csv"),
                        sum(a * b for a, b in ips) / sum(b for _, b in ips))
    assert set(meta["metrics"]["valid"]) >= {"mAP", "AP50", "accuracy", "threshold"}
    assert text.count("| tiny") == 1
    dets = Detector(model, meta)([FIXTURES / "valid" / "172.png"])
    assert len(dets) == 1 and dets[0].boxes.shape[1] == 4

    # fine-tuning from it replaces the export only if it beats the parent's validation metrics
    before = (tmp_path / "ck" / "tiny.safetensors").read_bytes()
    parent, parent_epochs = meta["metrics"]["valid"], meta["training"]["epochs_run"]
    ft = run(tmp_path, "--model", "fasterrcnn_resnet18_fpn", "--name", "tiny", "--epochs", "1", "--lr", "0.001",
             "--init-from", str(tmp_path / "ck" / "tiny"), "--out-dir", str(tmp_path / "ft"))
    beaten = (float(ft[0]["val_accuracy"]), float(ft[0]["val_mAP"])) > (round(parent["accuracy"], 4), round(parent["mAP"], 4))
    after = load_checkpoint(tmp_path / "ck" / "tiny")[1]
    assert ((tmp_path / "ck" / "tiny.safetensors").read_bytes() != before) == beaten
    assert ("init_from" in after["recipe"]) == beaten
    assert (f"| {parent_epochs} + 1 |" in card(tmp_path / "ck")) == beaten  # the card counts parent epochs

    # a parent measured with the digit reader is beaten or not by its detector-alone result
    side = tmp_path / "ck" / "tiny.json"
    meta = json.loads(side.read_text())
    meta["metrics"] = {"valid": {**meta["metrics"]["valid"], "accuracy": 1.0, "mAP": 1.0},
                       "valid_detector_only": {**meta["metrics"]["valid"], "accuracy": 0.0, "mAP": 0.0}}
    side.write_text(json.dumps(meta))
    run(tmp_path, "--model", "fasterrcnn_resnet18_fpn", "--name", "tiny", "--epochs", "1", "--lr", "0.001",
        "--init-from", str(tmp_path / "ck" / "tiny"), "--out-dir", str(tmp_path / "ft2"))
    assert load_checkpoint(tmp_path / "ck" / "tiny")[1]["recipe"]["init_from"]["metrics"]["valid"]["accuracy"] == 1.0


def test_select_map_exports_the_epoch_with_the_best_map(tmp_path):
    torch.manual_seed(0)
    log = run(tmp_path, "--model", "fasterrcnn_resnet18_fpn", "--name", "tiny", "--epochs", "3", "--select", "mAP")
    meta = load_checkpoint(tmp_path / "ck" / "tiny")[1]
    best = max(log, key=lambda r: (float(r["val_mAP"]), float(r["val_accuracy"])))  # the first of ties, like the trainer
    assert meta["recipe"]["select"] == "mAP" and meta["metrics"]["valid"]["epoch"] == int(best["epoch"])
    assert round(meta["metrics"]["valid"]["mAP"], 4) == float(best["val_mAP"])


def test_resume_restores_optimizer_and_scheduler(tmp_path):
    log = run(tmp_path, "--model", "fasterrcnn_resnet18_fpn", "--epochs", "1", "--max-iters", "2")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and state["lr_scheduler"]["last_epoch"] == 2
    assert state["optimizer"]["state"], "momentum buffers are saved"
    log = run(tmp_path, "--model", "fasterrcnn_resnet18_fpn", "--epochs", "2", "--max-iters", "2")
    assert [int(r["epoch"]) for r in log] == [0, 1]  # epoch 0 was not repeated
    state2 = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state2["lr_scheduler"]["last_epoch"] == 4

    from digit_demo.models import build_model, default_config

    model = build_model(default_config("fasterrcnn_resnet18_fpn", min_size=96, max_size=240))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = engine.make_scheduler(opt, "cosine", 2, 2, 3, 0.3, 0)
    progress = engine.load_state(tmp_path / "run" / "last.pt", model, opt, sched)
    start, best = progress["epoch"] + 1, progress["best"]
    assert start == 2 and sched.last_epoch == 4 and opt.state_dict()["state"]
    assert best is not None and "accuracy" in best


class Interrupted(Exception):
    """Stands for the machine stopping the job right after a save."""


def test_an_epoch_interrupted_mid_way_resumes_at_its_last_save_and_ends_as_if_never_stopped(tmp_path, monkeypatch):
    args = ("--model", "fasterrcnn_resnet18_fpn", "--epochs", "2", "--batch-size", "2", "--limit", "8", "--val-limit", "2",
            "--workers", "0", "--threads", "2")
    whole = run(tmp_path, *args, "--out-dir", str(tmp_path / "whole"), "--save-every", "0")
    real_save, saves = engine.save_state, []

    def save_then_stop(path, *a, **progress):
        real_save(path, *a, **progress)
        saves.append((progress["epoch"], (progress.get("partial") or {}).get("batches")))
        if saves[-1] == (0, 2):  # epoch 1, after its second batch of four
            raise Interrupted

    monkeypatch.setattr(engine, "save_state", save_then_stop)
    with pytest.raises(Interrupted):
        run(tmp_path, *args, "--out-dir", str(tmp_path / "cut"), "--save-every", "1e-9")
    assert saves == [(-1, 1), (-1, 2), (-1, 3), (-1, 4), (0, None), (0, 1), (0, 2)]
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state["partial"]["batches"] == 2 and state["partial"]["images"] == 4
    monkeypatch.setattr(engine, "save_state", real_save)
    resumed = run(tmp_path, *args, "--out-dir", str(tmp_path / "cut"), "--save-every", "0")
    assert [r["epoch"] for r in resumed] == ["0", "1"]  # epoch 0 was not run again
    # the resumed epoch continued the interrupted one: same batches, same random draws, same weights
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["lr_scheduler"]["last_epoch"] == 8


def test_time_budget_stops_the_run_and_anneals_over_the_budget(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    budget = engine.TimeBudget(100.0, spent=20.0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = engine.make_scheduler(opt, "cosine", 1000, 1000, 3, 0.3, 0, budget)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))  # resumed: 20 s spent
    clock[0] = 30.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5) and not budget.used_up()  # half the budget: half the LR
    clock[0] = 80.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12) and budget.used_up()
    monkeypatch.undo()

    # a real run with a budget far shorter than its epochs stops after the first epoch, fully annealed
    log = run(tmp_path, "--model", "fasterrcnn_resnet18_fpn", "--epochs", "50", "--time-budget", "0.001")
    assert len(log) == 1 and float(log[0]["lr"]) == 0.0


def test_resnet50_fpn_v2_recipe_runs_with_focal_loss(tmp_path, monkeypatch):
    from torchvision.models.detection import roi_heads

    monkeypatch.setattr(roi_heads, "fastrcnn_loss", roi_heads.fastrcnn_loss)  # undo the patch afterwards
    log = run(tmp_path, "--model", "fasterrcnn_resnet50_fpn_v2", "--epochs", "1", "--max-iters", "1", "--focal-loss",
              "--limit", "4", "--val-limit", "2")
    assert len(log) == 1 and float(log[0]["loss"]) > 0
    assert getattr(roi_heads.fastrcnn_loss, "_focal", False)


def test_focal_loss_down_weights_easy_examples():
    logits = torch.tensor([[4.0, 0, 0], [0, 0.2, 0]])
    labels = [torch.tensor([0, 1])]
    focal = engine.focal_fastrcnn_loss(0.25, 2.0)
    cls, _ = focal(logits, torch.zeros(2, 12), labels, [torch.zeros(2, 4)])
    ce = torch.nn.functional.cross_entropy(logits, labels[0])
    assert 0 < cls < ce


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    args = parse_args(["--config", "train/configs/resnet18_fpn.json", "--epochs", "2"])
    assert args.model == "fasterrcnn_resnet18_fpn" and args.epochs == 2 and args.lr_schedule == "cosine"
    assert recipe(args)["config"] == "train/configs/resnet18_fpn.json"  # the sidecar names the recipe file
    assert "config" not in recipe(parse_args(["--model", "fasterrcnn_resnet18_fpn"]))
    with pytest.raises(SystemExit):
        parse_args([])


def test_extra_json_adds_resolved_images_to_the_training_set(tmp_path):
    gt = load_coco(FIXTURES / "valid.json")
    keep = {im["id"] for im in gt["images"][:2]}
    extra = {**gt, "images": [im for im in gt["images"] if im["id"] in keep],
             "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
    path = tmp_path / "pseudo.json"
    path.write_text(json.dumps(extra))
    run(tmp_path, "--model", "fasterrcnn_resnet18_fpn", "--name", "tiny", "--epochs", "1", "--max-iters", "1",
        "--limit", "4", "--extra-json", str(path), "--extra-images", "valid")
    _, meta = load_checkpoint(tmp_path / "ck" / "tiny")
    assert meta["data"]["train_images"] == 6
    assert meta["data"]["extra"] == [{"json": str(path), "images": "valid", "count": 2}]
    # a shipped config names its extra labels; they are plain paths, not inside --data
    args = parse_args(["--config", "train/configs/resnet18_fpn_selftrain.json"])
    assert [str(p) for p in args.extra_json] == ["runs/pseudo/unlabeled_m8.json"] and args.init_from == "resnet18_fpn"
    assert "also trained on 2 `valid/` images labelled by `python -m train.resolve`" in card(tmp_path / "ck")


def test_channels_last_and_bf16_autocast_train_like_the_float32_default(tmp_path):
    """Memory layout must not change the arithmetic; bfloat16 autocast only rounds it. One step: its loss
    comes from the same initial weights in every run (later steps sample other proposals)."""
    common = ["--model", "fasterrcnn_resnet18_fpn", "--name", "tiny", "--epochs", "1", "--max-iters", "1"]
    logs, weights = {}, {}
    for name, extra in {"usual": [], "channels_last": ["--channels-last"], "bf16": ["--amp", "bf16"]}.items():
        logs[name] = run(tmp_path, *common, "--out-dir", str(tmp_path / name), *extra)[0]
        model, meta = load_checkpoint(tmp_path / "ck" / "tiny")
        weights[name] = model.state_dict()
        assert meta["recipe"]["channels_last"] == (name == "channels_last")
        assert meta["recipe"]["amp"] == ("bf16" if name == "bf16" else "none")
    loss = float(logs["usual"]["loss"])
    assert float(logs["channels_last"]["loss"]) == pytest.approx(loss, rel=1e-3)  # other conv kernels round differently
    assert float(logs["bf16"]["loss"]) == pytest.approx(loss, rel=0.05)
    worst = max((weights["channels_last"][k].float() - v.float()).abs().max().item() for k, v in weights["usual"].items()
                if v.is_floating_point())
    assert worst < 1e-2  # fp16 checkpoints of the same SGD step


def test_amp_auto_is_bf16_only_where_it_is_fast(monkeypatch):
    from train import cli

    monkeypatch.setattr(cli, "has_amx", lambda: False)
    assert cli.resolve_amp("auto", torch.device("cpu")) == "none"
    assert cli.resolve_amp("auto", torch.device("cuda")) == "bf16"
    assert cli.resolve_amp("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(cli, "has_amx", lambda: True)
    assert cli.resolve_amp("auto", torch.device("cpu")) == "bf16"
    assert cli.resolve_amp("none", torch.device("cpu")) == "none"


def test_speed_times_a_stage_as_its_config_trains_it(tmp_path):
    from digit_demo.inference import has_amx
    from train.smoke import make_smoke_data
    from train.speed import measure, stage_options

    data = make_smoke_data(tmp_path / "data")
    row = measure("resnet18_fpn", None, iters=1, warmup=1, data=data, batch_size=2)
    opts = stage_options("resnet18_fpn")
    assert row["images"] == 2 and row["images_per_s"] > 0
    assert row["channels_last"] is bool(opts["--channels-last"]) and row["workers"] == opts["--workers"]
    assert row["amp"] == {"auto": "bf16" if has_amx() else "none"}.get(opts["--amp"], opts["--amp"])
    forced = measure("resnet18_fpn", "none", iters=1, warmup=1, data=data, batch_size=2, channels_last=False, workers=0)
    assert forced["amp"] == "none" and forced["channels_last"] is False and forced["workers"] == 0
