"""The reproduction graph (``train.reproduce``): skipping, staleness, resuming and selection on toy
stages, and the real graph end to end on the fixture images (``--smoke``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from digit_demo.evaluation import Metrics, best
from train import reproduce
from train.reproduce import Reproduction, select

ROOT = Path(__file__).resolve().parent.parent


def toy_configs(folder: Path, graph=("a", "b", "c")) -> Path:
    """Three toy stages a -> b -> c, each writing out.txt from its text and its inputs'."""
    folder.mkdir(parents=True, exist_ok=True)
    needs = {"a": [], "b": ["a"], "c": ["b"]}
    for name in graph:
        options = {"--out": "{out}", "--text": name, "--inputs": [f"{{runs}}/{n}/out.txt" for n in needs[name]] or None}
        (folder / f"{name}.json").write_text(json.dumps({
            "run": {"module": "tests.toy_stage", "options": options}, "needs": needs[name], "outputs": ["out.txt"],
            "minutes": {"cpu": 2}}))
    return folder


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "GRAPH", ("a", "b", "c"))
    configs = toy_configs(tmp_path / "configs")

    def make(smoke=False):
        return Reproduction(tmp_path / "runs", tmp_path / "data", tmp_path / "release", smoke, configs=configs)

    return make, tmp_path / "runs", configs


def runs_of(runs: Path, name: str) -> int:
    return int((runs / name / "runs.txt").read_text())


def test_graph_runs_in_order_then_skips_what_is_up_to_date(toy):
    make, runs, _ = toy
    repro = make()
    assert [r["state"] for r in repro.plan(["a", "b", "c"])] == ["to run"] * 3
    assert repro.run(["a", "b", "c"]) == 0
    assert (runs / "c" / "out.txt").read_text() == "cba"  # each stage read the one before's output
    assert repro.run(["a", "b", "c"]) == 0
    assert [runs_of(runs, n) for n in "abc"] == [1, 1, 1]  # nothing ran twice
    assert [r["state"] for r in make().plan(["a", "b", "c"])] == ["up to date"] * 3
    assert all(json.loads((runs / n / "done.json").read_text())["seconds"] >= 0 for n in "abc")


def test_changing_a_config_makes_it_and_what_follows_stale(toy):
    make, runs, configs = toy
    make().run(["a", "b", "c"])
    cfg = json.loads((configs / "b.json").read_text())
    cfg["run"]["options"]["--text"] = "B"
    (configs / "b.json").write_text(json.dumps(cfg))
    assert [r["state"] for r in make().plan(["a", "b", "c"])] == ["up to date", "stale: starts over", "stale: starts over"]
    assert make().run(["a", "b", "c"]) == 0
    assert [runs_of(runs, n) for n in "abc"] == [1, 1, 1]  # b and c started over in cleared folders
    assert (runs / "c" / "out.txt").read_text() == "cBa"
    assert make(smoke=True).plan(["a"])[0]["state"] != "up to date"  # smoke and full runs never mix


def test_a_new_time_estimate_or_description_keeps_a_finished_stage(toy):
    make, runs, configs = toy
    make().run(["a", "b", "c"])
    cfg = json.loads((configs / "a.json").read_text())
    cfg["minutes"] = {"cpu": 70, "gpu": 6}
    cfg["about"] = "the first toy stage"
    (configs / "a.json").write_text(json.dumps(cfg, indent=2))
    plan = make().plan(["a", "b", "c"])
    assert [r["state"] for r in plan] == ["up to date"] * 3 and plan[0]["minutes"] == 70


def test_an_interrupted_stage_resumes_and_the_graph_stops_there(toy, capsys):
    make, runs, _ = toy
    (runs / "b").mkdir(parents=True)
    (runs / "b" / "fail").write_text("")
    assert make().run(["a", "b", "c"]) == 3
    assert "b: failed (exit 3): toy: told to fail; see" in capsys.readouterr().err  # its last line, in the graph's log
    assert not (runs / "c").exists()  # nothing after the failure ran
    assert make().plan(["b"])[1]["state"] == "interrupted: resumes"
    (runs / "b" / "fail").unlink()
    assert make().run(["a", "b", "c"]) == 0
    assert runs_of(runs, "b") == 2 and (runs / "b" / "out.txt").read_text() == "ba (resumed)"  # its state was kept
    assert runs_of(runs, "a") == 1


def test_a_stage_time_adds_up_over_its_attempts(toy, monkeypatch):
    make, runs, _ = toy
    monkeypatch.setattr(reproduce, "HEARTBEAT", 0.1)
    (runs / "b").mkdir(parents=True)
    (runs / "b" / "fail").write_text("")
    (runs / "b" / "slow").write_text("1.0")
    assert make().run(["a", "b"]) == 3
    first = json.loads((runs / "b" / "spent.json").read_text())
    assert first["attempts"] == 1 and first["seconds"] >= 1.0
    (runs / "b" / "fail").unlink()
    (runs / "b" / "slow").write_text("0.5")
    assert make().run(["a", "b"]) == 0
    done = json.loads((runs / "b" / "done.json").read_text())
    assert done["attempts"] == 2 and done["seconds"] >= first["seconds"] + 0.5
    assert json.loads((runs / "a" / "done.json").read_text())["attempts"] == 1
    assert ", 2 tries" in make().plan(["b"])[1]["took"]


def test_setup_runs_before_a_full_stage_and_never_in_smoke(toy):
    make, runs, configs = toy
    cfg = json.loads((configs / "a.json").read_text())
    cfg["setup"] = [{"module": "tests.toy_stage", "options": {"--out": "{out}/setup", "--text": "ready"}}]
    (configs / "a.json").write_text(json.dumps(cfg))
    assert make(smoke=True).run(["a"]) == 0
    assert not (runs / "a" / "setup").exists()
    assert make().run(["a"]) == 0  # smoke and full runs have their own fingerprints: a runs again, in full
    assert (runs / "a" / "setup" / "out.txt").read_text() == "ready" and runs_of(runs, "a") == 1


def test_only_needs_its_inputs_up_to_date_and_from_selects_the_rest(toy):
    make, runs, _ = toy
    assert make().run(["b"]) == 1 and not (runs / "b" / "out.txt").exists()
    assert select(["a", "b", "c"], None, "b") == ["b", "c"]
    assert select(["a", "b", "c"], ["c"], None) == ["c"]
    with pytest.raises(SystemExit):
        select(["a", "b", "c"], ["nope"], None)


def test_the_shipped_graph_is_declared_in_order_and_every_input_is_a_path():
    stages = reproduce.load_graph()
    assert [s.name for s in stages] == list(reproduce.GRAPH)
    for stage in stages:
        places = {"data": "D", "runs": "R", "out": "O", "release": "REL"}
        tokens = stage.argv(False, places) + list(stage.env(places).values())
        for need in stage.needs:  # it reads its inputs by path, from their folders
            assert any(t == f"R/{need}" or t.startswith(f"R/{need}/") for t in tokens), (stage.name, need)
        assert not any("checkpoints" in t for t in tokens if not t.startswith(("O/", "R/", "--"))), stage.name
    release = stages[-1]
    assert release.name == "release" and "--to REL" in " ".join(release.argv(False, {"data": "D", "runs": "R", "out": "O", "release": "REL"}))


@pytest.mark.slow
def test_smoke_reproduction_runs_every_stage_and_the_release_reads_an_image(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "train.reproduce", "--smoke", "--runs", str(runs)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in reproduce.GRAPH:
        assert json.loads((runs / name / "done.json").read_text())["smoke"] is True
    released = runs / "released"
    shipped = {p.stem for p in released.glob("*.safetensors")}
    assert shipped == {"resnet18_fpn", "resnet34_fpn", "mobilenet_v3_fpn", "digit_reader", "number_reader",
                       "number_proposer", "locator"}
    # thresholds were chosen on the tuning split; valid only reports, at that threshold
    tune = json.loads((runs / "calibrate" / "benchmark" / "sweeps.json").read_text())
    meta = json.loads((released / "resnet18_fpn.json").read_text())
    assert meta["threshold"] == best([Metrics(**r) for r in tune["resnet18_fpn"]]).threshold
    assert meta["metrics"]["valid"]["threshold_chosen_on"] == "tune"
    assert meta["metrics"]["valid"]["threshold"] == meta["threshold"]
    assert json.loads((released / "digit_reader.json").read_text())["tuned"]["chosen_on"].startswith("tuning split")
    assert "chosen on a tuning split carved from" in (released / "README.md").read_text()
    # how the readers and PP-OCR share a crop was chosen on the tuning split, for these readers, and ships
    text = json.loads((released / "ppocr.json").read_text())
    for name in ("settle", "min_score_whole"):
        assert text["tuned"]["chosen_on"][name].startswith("tuning split")
        tried = {r[name]: r["read"] for r in text["tuning"][name]}
        assert text["tuned"][name] in tried and tried[text["tuned"][name]] == max(tried.values())
    # each sidecar names the stage that made it: the last to write a checkpoint of its name
    makers = {"resnet18_fpn": "resnet18_fpn_self", "resnet34_fpn": "resnet34_fpn", "digit_reader": "digit_reader",
              "number_proposer": "number_proposer", "locator": "locator"}
    for name, stage in makers.items():
        made = json.loads((released / f"{name}.json").read_text())["made_by"]
        done_stage = json.loads((runs / stage / "done.json").read_text())
        assert made["stage"] == stage and made["fingerprint"] == done_stage["fingerprint"] and made["time"] == done_stage["time"]
    card = (released / "README.md").read_text()
    assert "## How these were made" in card and "| resnet18_fpn_self |" in card and "By hand-run stages" not in card
    # the released pipeline reads an image
    env = {**os.environ, "DIGIT_DEMO_CHECKPOINTS": str(released)}
    out = tmp_path / "pred"
    read = subprocess.run([sys.executable, "-m", "digit_demo", "predict", str(ROOT / "tests/fixtures/valid/172.png"),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert read.returncode == 0, read.stderr[-2000:]
    assert (out / "pred.csv").read_text().splitlines()[1].startswith("172,")
    # run again: every stage is up to date and nothing runs
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr.count("up to date") == len(reproduce.GRAPH)


def test_release_takes_thresholds_from_the_tuning_split_and_reports_valid_at_them(tmp_path):
    from digit_demo.release import tuned_results

    def rows(best_at, peak):
        return [Metrics(t, 0.4, 0.8, 0.3, peak if t == best_at else peak - 0.05) for t in (0.3, 0.5, 0.7)]

    # on valid the best threshold is 0.7 (0.90); the tuning split prefers 0.5, where valid reads 0.85
    results = {"a": {"accuracy": 0.90, "threshold": 0.7}, "b": {"accuracy": 0.8}, "a+b": {"members": ["a", "b"]}}
    report = {"a": rows(0.7, 0.90), "b": rows(0.5, 0.80), "a+b": rows(0.5, 0.86)}
    tune = {"a": rows(0.5, 0.95), "b": rows(0.5, 0.90), "a+b": rows(0.3, 0.97)}
    out = tuned_results(results, report, tune)
    assert out["a"]["threshold"] == 0.5 and out["a"]["accuracy"] == pytest.approx(0.85)
    assert out["a"]["threshold_chosen_on"] == "tune" and out["a"]["tune"]["accuracy"] == 0.95
    assert out["b"]["accuracy"] == pytest.approx(0.80)
    assert out["a+b"]["threshold"] == 0.3 and out["a+b"]["accuracy"] == pytest.approx(0.81)
    assert out["a+b"]["beats_best_member"]["accuracy"] is False  # 0.81 < a's 0.85, judged at the tuned thresholds


def test_the_tuning_split_is_exact_tier_seeded_and_disjoint_from_fit(tmp_path):
    from train.splits import split, tuning_ids

    images = [{"id": i, "label_tier": "exact" if i % 3 == 0 else "resolved"} for i in range(60)]
    coco = {"images": images, "annotations": [{"id": k, "image_id": i} for k, i in enumerate(range(60))]}
    ids = tuning_ids(images, 5)
    assert len(ids) == 5 and all(i % 3 == 0 for i in ids)
    assert ids == tuning_ids(list(reversed(images)), 5)  # the order of train.json does not matter
    assert ids != tuning_ids(images, 5, seed=1)
    fit, tune = split(coco, ids)
    assert {im["id"] for im in tune["images"]} == ids and {a["image_id"] for a in tune["annotations"]} == ids
    assert len(fit["images"]) == 55 and not ids & {a["image_id"] for a in fit["annotations"]}
    with pytest.raises(ValueError):
        tuning_ids(images, 21)  # only 20 exact images


@pytest.mark.parametrize("amx", [True, False])
def test_the_plan_warns_where_the_cpu_has_no_amx(tmp_path, monkeypatch, capsys, amx):
    monkeypatch.setattr(reproduce, "has_amx", lambda: amx)
    assert reproduce.main(["--plan", "--runs", str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert "left to run" in out and all(name in out for name in reproduce.GRAPH)
    assert (reproduce.NO_AMX in err) is not amx
    assert reproduce.main(["--plan", "--device", "gpu", "--runs", str(tmp_path / "runs")]) == 0
    assert reproduce.NO_AMX not in capsys.readouterr().err  # the GPU estimates do not depend on it


def test_the_graphs_state_lives_outside_the_work_tree_and_the_plan_says_where(tmp_path, monkeypatch, capsys):
    from train import reproduce

    monkeypatch.delenv(reproduce.RUNS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert reproduce.default_runs() == tmp_path / "home" / ".cache" / "digit_demo" / "reproduce"
    monkeypatch.setenv(reproduce.RUNS_ENV, str(tmp_path / "elsewhere"))
    assert reproduce.default_runs() == tmp_path / "elsewhere"
    assert reproduce.main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert f"state: {tmp_path / 'elsewhere'} (0 of " in out and "not there yet: a run starts over" in out
    # what this machine chose for a stage is shown (a choice recorded for another machine is not)
    stage = reproduce.load_graph()[reproduce.GRAPH.index("resnet34_fpn")]
    record = {f"{reproduce.machine_key()} | {stage.speed_key()}": {"--workers": 0, "--channels-last": False, "images_per_s": 7.0},
              f"another machine | {stage.speed_key()}": {"--workers": 1, "--channels-last": True}}
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "speed.json").write_text(json.dumps(record))
    assert reproduce.main(["--plan"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "runs here with" in line]
    assert lines == [f"resnet34_fpn: runs here with --workers 0 no --channels-last (chosen by train.speed, kept in "
                     f"{tmp_path / 'elsewhere' / 'speed.json'})"]


def test_how_a_stage_runs_fastest_is_chosen_once_per_machine_and_changes_nothing_it_makes(toy):
    make, runs, configs = toy
    make().run(["a", "b", "c"])
    before = make().fingerprints()
    cfg = json.loads((configs / "a.json").read_text())
    cfg["speed"] = ["--text"]  # the runner picks this option per machine
    (configs / "a.json").write_text(json.dumps(cfg))
    assert make().fingerprints() == before  # declaring it makes nothing stale
    calls = []

    def probe(stage):  # what train.speed --choose would measure on this machine
        calls.append(stage.name)
        return {"--text": "fast", "--out": "/elsewhere", "images_per_s": 9.5}

    def repro(smoke=False):
        return Reproduction(runs, runs.parent / "data", runs.parent / "release", smoke, configs=configs, probe=probe)

    (runs / "a" / "done.json").unlink()  # a runs again, b and c stay done
    assert repro().run(["a", "b", "c"]) == 0
    assert (runs / "a" / "out.txt").read_text().startswith("fast")  # the chosen option ran; --out is not the runner's
    assert json.loads((runs / "a" / "done.json").read_text())["speed"] == {"--text": "fast"}
    recorded = json.loads((runs / "speed.json").read_text())
    assert list(recorded) == [f"{reproduce.machine_key()} | {{\"stage\": \"a\"}}"] and calls == ["a"]
    (runs / "a" / "done.json").unlink()
    assert repro().run(["a"]) == 0 and calls == ["a"]  # the machine's choice is kept, not measured again
    assert repro(smoke=True).speed_for(repro().by_name["a"]) == {}  # smoke runs keep the config's options


@pytest.mark.slow
def test_train_speed_times_each_way_to_train_and_picks_the_fastest(tmp_path):
    from train.speed import choose

    (tmp_path / "train").symlink_to(ROOT / "tests" / "fixtures" / "valid")
    (tmp_path / "train.json").symlink_to(ROOT / "tests" / "fixtures" / "valid.json")
    out = choose("resnet18_fpn", tmp_path, iters=1, warmup=0)
    ways = {(t["workers"], t["channels_last"]) for t in out["tried"]}
    assert ways == {(0, False), (0, True), (1, False), (1, True)}
    fastest = max(out["tried"], key=lambda t: t["images_per_s"])
    assert (out["--workers"], out["--channels-last"], out["images_per_s"]) == (fastest["workers"], fastest["channels_last"], fastest["images_per_s"])
    assert all(t["images_per_s"] > 0 for t in out["tried"])
