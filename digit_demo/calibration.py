"""Calibration: the threshold sweep and best threshold of each pipeline configuration, looked up in
the data shipped with the checkpoints (``checkpoints/sweeps.json`` and each detector's sidecar),
which only the release step (:mod:`digit_demo.release`) writes."""
from __future__ import annotations

import json
from itertools import permutations
from pathlib import Path

from .checkpoints import CHECKPOINT_DIR, CheckpointError, available, read_sidecar, resolve
from .evaluation import Metrics, best

SWEEPS = "sweeps.json"


def sweep_curves(directory: Path = CHECKPOINT_DIR) -> dict[str, list[Metrics]]:
    """Every measured sweep by configuration key: each detector's own (its sidecar's ``sweep``),
    overridden by ``sweeps.json``, which also holds the variants and ensembles."""
    curves = {}
    for name in available(directory):
        meta = read_sidecar(directory / f"{name}.safetensors")
        if meta.get("sweep"):
            curves[meta["name"]] = [Metrics(**r) for r in meta["sweep"]]
    path = directory / SWEEPS
    if path.is_file():
        curves.update({k: [Metrics(**r) for r in rows] for k, rows in json.loads(path.read_text()).items()})
    return curves


def measured_key(config, curves: dict[str, list]) -> str | None:
    """The key of the sweep measured for ``config`` (a :class:`digit_demo.pipeline.PipelineConfig`):
    its own, with the members named in any order (fusion depends on their order only through exact
    ties); else the same reading in the default precision; else at one input size where two were not
    measured; None when none was."""
    own_fp32 = config.key != config.key_for(fp32=False)  # marked "(fp32)": float32 where bf16 is the default
    keys = [config.key_for(list(order), multi_scale=size, fp32=fp32)
            for size in dict.fromkeys((config.multi_scale, False)) for fp32 in dict.fromkeys((own_fp32, False))
            for order in permutations(config.names)]
    return next((k for k in keys if k in curves), None)


def threshold_for(config, curves: dict[str, list] | None = None) -> float:
    """The best measured threshold for ``config``: its sweep's (:func:`measured_key`), else a single
    detector's sidecar threshold, else 0.5."""
    curves = sweep_curves() if curves is None else curves
    key = measured_key(config, curves)
    if key:
        return best(curves[key]).threshold
    if len(config.models) == 1:
        try:
            return float(read_sidecar(resolve(config.models[0])).get("threshold", 0.5))
        except CheckpointError:  # nothing to go by: loading the model reports what is missing
            return 0.5
    return 0.5
