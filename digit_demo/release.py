"""The release step: the only writer of what ships beside the weights.

``python -m digit_demo release --results out/benchmark`` takes what ``benchmark.py`` measured
(its ``results.json`` and ``sweeps.json``) and writes ``checkpoints/sweeps.json`` (the calibration the
pipeline's thresholds come from, :mod:`digit_demo.calibration`), ``checkpoints/benchmark.json``, each
detector sidecar's measured ``metrics``, ``threshold``, ``sweep`` and ``benchmark`` entries, and the
model card. Measuring writes nothing shipped; releasing runs no model.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .card import write_model_card
from .checkpoints import CHECKPOINT_DIR, available
from .evaluation import Metrics, best
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


def release(results_dir: Path, directory: Path = CHECKPOINT_DIR) -> list[Path]:
    """Write the measured calibration, metrics and model card into ``directory``; returns the files written."""
    results = json.loads((results_dir / "results.json").read_text())
    sweeps = json.loads((results_dir / "sweeps.json").read_text())
    curves = {k: [Metrics(**r) for r in rows] for k, rows in sweeps.items()}
    written = [directory / "sweeps.json", directory / "benchmark.json"]
    written[0].write_text(json.dumps(sweeps, indent=1))
    written[1].write_text(json.dumps(results, indent=2) + "\n")
    for name in available(directory):
        configs = variant_configs(name)
        if configs["full"].key not in curves:
            continue
        side = directory / f"{name}.json"
        meta = json.loads(side.read_text())
        top = best(curves[name])
        meta["benchmark"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in results[name].items()}
        meta["metrics"]["valid"] = {**top.__dict__, "measured_by": "benchmark.py",
                                    "epoch": meta["metrics"].get("valid", {}).get("epoch"),
                                    "reader": results[name].get("reader")}
        for variant in VARIANTS:  # each variant measured now, and none left from an earlier release
            config = configs.get(variant)
            if config is not None and config.key in curves:
                meta["metrics"][f"valid_{variant}"] = dict(best(curves[config.key]).__dict__)
            else:
                meta["metrics"].pop(f"valid_{variant}", None)
        meta["threshold"] = top.threshold
        meta["sweep"] = sweeps[name]
        side.write_text(json.dumps(meta, indent=2) + "\n")
        written.append(side)
    written.append(write_model_card(directory))
    return written
