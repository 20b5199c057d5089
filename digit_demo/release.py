"""The release step: the only writer of what ships beside the weights.

``python -m digit_demo release --results out/benchmark`` takes what ``benchmark.py`` measured
(its ``results.json`` and ``sweeps.json``) and writes ``checkpoints/sweeps.json`` (the calibration the
pipeline's thresholds come from, :mod:`digit_demo.calibration`), ``checkpoints/benchmark.json``, each
detector sidecar's measured ``metrics``, ``threshold``, ``sweep`` and ``benchmark`` entries, and the
model card. Measuring writes nothing shipped; releasing runs no model of its own (its gate may read
`valid` with what ships, below).

With ``--calibration DIR`` (``benchmark.py`` on the tuning split) the thresholds are chosen there and
``--results`` (on `valid`) only reports: each row's accuracy and mAP are `valid`'s at the tuned
threshold, not at `valid`'s best. ``--weights DIR`` first copies the checkpoints in ``DIR`` (weights
and sidecars) into the release folder, as the reproduction's release stage does; it refuses (raises
:class:`WorseThanShipped`, writing nothing) when the new default detector reads fewer `valid` numbers
than the one it would replace, or a pipeline reads fewer real_dev photos; nothing overrides it. With
``--gt``/``--images`` (`valid`), what ships is read again with today's code (:func:`shipped_reads_now`),
since a sidecar's recorded figure may predate the pipeline that reads it now.
`valid` and real_dev decide only whether to ship, never a threshold, size or weight.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from .card import write_model_card
from .checkpoints import CHECKPOINT_DIR, DEFAULT_MODEL, available, read_sidecar, measured
from .evaluation import Metrics, best
from .ocr import SIDECAR as PPOCR_SIDECAR
from .pipeline import PipelineConfig

# Each detector's variants besides its full reading: the PipelineConfig fields they change. Their keys
# (PipelineConfig.key) name their rows and sweeps; a sidecar keeps each one's best as ``valid_<variant>``.
VARIANTS = {"detector_only": {"digit_reader": None}, "multi_scale": {"multi_scale": True},
            "no_number_reader": {"number_reader": None}, "no_proposer": {"proposer": None},
            "fp32": {"precision": "fp32"}}


def variant_configs(name: str) -> dict[str, PipelineConfig]:
    """The full reading of detector ``name`` (as "full") and each of its :data:`VARIANTS` whose key
    differs from it (on a CPU without AMX, fp32 is the full reading itself)."""
    full = PipelineConfig((name,))
    out = {"full": full}
    for variant, fields in VARIANTS.items():
        config = replace(full, **fields)
        if config.key != full.key:
            out[variant] = config
    return out


def at_threshold(rows: list[Metrics], threshold: float) -> Metrics:
    """The sweep row measured at ``threshold`` (the nearest one)."""
    return min(rows, key=lambda r: abs(r.threshold - threshold))


def tuned_results(results: dict, report: dict[str, list[Metrics]], tune: dict[str, list[Metrics]]) -> dict:
    """``results`` (measured on `valid`) with each row's threshold chosen on the tuning split and its
    accuracy and mAP read off `valid`'s sweep at that threshold."""
    out = {}
    for key, row in results.items():
        if key in report and key in tune:
            chosen = best(tune[key])
            at = at_threshold(report[key], chosen.threshold)
            row = {**row, **at.__dict__, "threshold_chosen_on": "tune", "tune": dict(chosen.__dict__)}
        out[key] = row
    judge_ensembles(out)
    return out


def judge_ensembles(results: dict) -> None:
    """Mark each ensemble row (one with ``members``) with whether it reads at least as many numbers as
    its most accurate member, and has at least its best member's mAP, at the rows' own thresholds."""
    for row in results.values():
        if isinstance(row, dict) and "members" in row:
            top = max(row["members"], key=lambda m: results[m]["accuracy"])
            row["beats_best_member"] = {"accuracy": row["accuracy"] >= results[top]["accuracy"],
                                        "mAP": row["mAP"] >= max(results[m]["mAP"] for m in row["members"])}


def copy_weights(source: Path, directory: Path) -> list[Path]:
    """Copy every checkpoint (weights and sidecar: detectors, readers, locator) in the folder ``source``,
    and its PP-OCR stage's settings (``ppocr.json``) where it has them, or the one checkpoint ``source``
    names, into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    copied = []
    for weights in sorted(source.glob("*.safetensors")) if source.is_dir() else [source.with_suffix(".safetensors")]:
        for suffix in (".safetensors", ".json"):
            copied.append(Path(shutil.copy(weights.with_suffix(suffix), directory / f"{weights.stem}{suffix}")))
    if source.is_dir() and (source / PPOCR_SIDECAR).is_file():
        copied.append(Path(shutil.copy(source / PPOCR_SIDECAR, directory / PPOCR_SIDECAR)))
    return copied


class WorseThanShipped(RuntimeError):
    """The checkpoints to release read fewer numbers, of `valid` or of real_dev, than the ones they
    would replace."""


def shipped_accuracy(directory: Path, name: str = DEFAULT_MODEL) -> float | None:
    """The `valid` accuracy the release folder's ``name`` sidecar records, or None without one."""
    side = directory / f"{name}.json"
    if not side.is_file():
        return None
    return measured(read_sidecar(side), "valid").get("accuracy")


def real_by_label(rows: dict) -> dict[str, float]:
    """real_dev accuracy by each of our pipelines' label ("text lines" for the row "text lines:
    resnet18_fpn (ppocr)": the label survives a change of precision or checkpoint names), off-the-shelf
    OCR rows (no label) left out."""
    return {k.split(":")[0]: r["accuracy"] for k, r in rows.items() if ":" in k}


def shipped_real(directory: Path) -> dict[str, float]:
    """The real_dev accuracy of each of our pipelines that the release folder's ``benchmark.json``
    records (``benchmark.py --real``), by label (:func:`real_by_label`)."""
    bench = directory / "benchmark.json"
    return real_by_label((json.loads(bench.read_text()).get("real_dev") or {}) if bench.is_file() else {})


def shipped_reads_now(directory: Path, gt: Path, images: Path, precision: str | None = None,
                      name: str = DEFAULT_MODEL) -> float | None:
    """The share of ``gt``'s numbers that ``name``'s default pipeline, built from ``directory``'s
    checkpoints and calibration, reads with today's code (``digit_demo evaluate`` in a process of its
    own, at ``precision`` where given); None where ``directory`` ships no ``name``."""
    if not (directory / f"{name}.safetensors").is_file():
        return None
    cmd = [sys.executable, "-m", "digit_demo", "evaluate", "--gt", str(gt), "--images", str(images), "-m", name, "-q"]
    env = {**os.environ, "DIGIT_DEMO_CHECKPOINTS": str(Path(directory).resolve())}
    r = subprocess.run(cmd + (["--precision", precision] if precision else []), env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"could not read {gt} with what {directory} ships: "
                           f"{(r.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["accuracy"]


def check_not_worse(results: dict, directory: Path, name: str = DEFAULT_MODEL, shipped_now: float | None = None) -> None:
    """Raise :class:`WorseThanShipped` when ``results[name]`` reads fewer `valid` numbers than what
    ``directory`` ships (``shipped_now``, as :func:`shipped_reads_now` measured it, else the figure its
    sidecar records), or any pipeline ``directory`` measured on real_dev reads fewer of its photos in
    ``results["real_dev"]`` (or was not measured there). Nothing shipped, or nothing measured for
    ``name``, passes the `valid` check."""
    old = shipped_now if shipped_now is not None else shipped_accuracy(directory, name)
    new = (results.get(name) or {}).get("accuracy")
    worse = []
    if old is not None and new is not None and new < old:
        worse.append(f"the new {name} reads {new:.3f} of valid numbers (mAP {results[name].get('mAP', float('nan')):.3f}), "
                     f"the one shipped {old:.3f} ({'read now' if shipped_now is not None else 'as recorded'})")
    measured_real = real_by_label(results.get("real_dev") or {})
    for row, before in shipped_real(directory).items():
        now = measured_real.get(row)
        if now is None:
            worse.append(f"{row!r} was not measured on real_dev (benchmark.py --real); the one shipped reads {before:.3f}")
        elif now < before:
            worse.append(f"{row!r} reads {now:.3f} of real_dev, the one shipped {before:.3f}")
    if worse:
        raise WorseThanShipped(f"{'; '.join(worse)} (in {directory}): nothing was released; change the recipe "
                               f"and run again, or release --to another folder to inspect it")


def stamp_provenance(directory: Path, stages: dict) -> list[Path]:
    """Name in each sidecar in ``directory`` the reproduction stage that made its checkpoint
    (``made_by``: the last stage, in graph order, that wrote a checkpoint of that name; its fingerprint,
    device, time and when it finished), and keep the whole record as ``reproduction.json`` (the model
    card's time per stage). ``stages`` is the runner's record (``train.reproduce``: runs/stages.json)."""
    written = []
    for weights in sorted(directory.glob("*.safetensors")):
        makers = [name for name, st in stages.items() if weights.stem in st.get("checkpoints", [])]
        side = weights.with_suffix(".json")
        if not makers or not side.is_file():
            continue
        meta = json.loads(side.read_text())
        st = stages[makers[-1]]
        meta["made_by"] = {"stage": makers[-1], **{k: st.get(k) for k in ("fingerprint", "device", "seconds", "time")},
                           "graph": "python -m train.reproduce"}
        side.write_text(json.dumps(meta, indent=2) + "\n")
        written.append(side)
    record = directory / "reproduction.json"
    record.write_text(json.dumps(stages, indent=1) + "\n")
    return [*written, record]


def release(results_dir: Path, directory: Path = CHECKPOINT_DIR, calibration: Path | None = None,
            weights: Path | None = None, stages: Path | None = None,
            gt: Path | None = None, images: Path | None = None) -> list[Path]:
    """Write the measured calibration, metrics and model card into ``directory``; returns the files
    written. With ``calibration``, thresholds come from its sweeps and ``results_dir`` only reports.
    With ``weights`` (new checkpoints) it first checks they are not worse than what ships
    (:func:`check_not_worse`; with ``gt`` and ``images``, against what ships read now). With
    ``stages`` (the reproduction's record),
    each sidecar names the stage that made it (:func:`stamp_provenance`)."""
    results = json.loads((results_dir / "results.json").read_text())
    sweeps = json.loads((results_dir / "sweeps.json").read_text())
    curves = {k: [Metrics(**r) for r in rows] for k, rows in sweeps.items()}
    if calibration is not None:
        tune_sweeps = json.loads((calibration / "sweeps.json").read_text())
        tune = {k: [Metrics(**r) for r in rows] for k, rows in tune_sweeps.items()}
        results = tuned_results(results, curves, tune)
        report, sweeps, curves = curves, tune_sweeps, tune
    else:
        report = curves
    if weights:
        now = None
        if gt is not None and images is not None:
            now = shipped_reads_now(directory, gt, images, (results.get(DEFAULT_MODEL) or {}).get("precision"))
        check_not_worse(results, directory, shipped_now=now)
    written = copy_weights(weights, directory) if weights else []
    if stages is not None:
        written += stamp_provenance(directory, json.loads(stages.read_text()))
    (directory / "sweeps.json").write_text(json.dumps(sweeps, indent=1))
    (directory / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    written += [directory / "sweeps.json", directory / "benchmark.json"]
    for name in available(directory):
        configs = variant_configs(name)
        if configs["full"].key not in curves or configs["full"].key not in report:
            continue
        side = directory / f"{name}.json"
        meta = json.loads(side.read_text())
        top = best(curves[name])  # on the split that chooses: the tuning split with a calibration
        shown = at_threshold(report[name], top.threshold)  # on the split that reports (the same one without)
        meta["benchmark"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in results[name].items()
                             if k != "tune"}
        if calibration is not None:
            meta["metrics"]["tune"] = dict(top.__dict__)
        meta["metrics"]["valid"] = {**shown.__dict__, "measured_by": "benchmark.py",
                                    "threshold_chosen_on": "tune" if calibration is not None else "valid",
                                    "epoch": (measured(meta, "valid") or measured(meta, "tune")).get("epoch"),
                                    "reader": results[name].get("reader")}
        for variant in VARIANTS:  # each variant measured now, and none left from an earlier release
            config = configs.get(variant)
            if config is not None and config.key in curves and config.key in report:
                chosen = best(curves[config.key])
                meta["metrics"][f"valid_{variant}"] = dict(at_threshold(report[config.key], chosen.threshold).__dict__)
            else:
                meta["metrics"].pop(f"valid_{variant}", None)
        meta["threshold"] = top.threshold
        meta["sweep"] = sweeps[name]
        side.write_text(json.dumps(meta, indent=2) + "\n")
        written.append(side)
    written.append(write_model_card(directory))
    return written
