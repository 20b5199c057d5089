"""Evaluation: COCO mAP (pycocotools), whole-number accuracy, and a threshold sweep."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .assemble import THRESHOLDS
from .data import gt_numbers
from .io import coco_results
from .reading import Reading
from .types import Detections, Found


def _coco_gt(gt: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_map(gt: dict | COCO, results: list[dict]) -> dict[str, float]:
    """AP@[.5:.95], AP50 and AP75 of COCO ``results`` over every ground-truth image.

    An empty result list scores 0 (pycocotools' ``loadRes`` cannot take one).
    """
    if not results:
        return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    coco = gt if isinstance(gt, COCO) else _coco_gt(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(float(s), 0.0) for s in ev.stats[:3]]  # -1 means "no such objects": report 0
    return {"mAP": stats[0], "AP50": stats[1], "AP75": stats[2]}


def number_accuracy(gt: dict[int, str], pred: dict[int, int]) -> float:
    """Share of ground-truth images whose number is read exactly (as ``pred.csv`` labels)."""
    if not gt:
        return 0.0
    return sum(pred.get(i, -1) == (int(t) if t else -1) for i, t in gt.items()) / len(gt)


@dataclass
class Metrics:
    threshold: float
    mAP: float
    AP50: float
    AP75: float
    accuracy: float


def _readings(found: dict[int, Reading | Found | Detections]) -> dict[int, Reading]:
    """Readings by image id; what was found in an image read whole stands for its reading."""
    return {i: r if isinstance(r, Reading) else Reading.of(str(i), r) for i, r in found.items()}


def evaluate(gt: dict, found: dict[int, Reading | Found | Detections], threshold: float = 0.5, coco: COCO | None = None) -> Metrics:
    """mAP of the detections scoring at least ``threshold`` and accuracy of the numbers read at it,
    from each image's reading (or raw detections) by image id, exactly as ``predict`` writes them
    (``pred.json``: :meth:`Reading.kept`; ``pred.csv``: :meth:`Reading.number`)."""
    readings = _readings(found)
    ap = coco_map(coco or gt, coco_results({i: r.kept(threshold) for i, r in readings.items()}))
    labels = {i: r.number(threshold).label for i, r in readings.items()}
    return Metrics(threshold, ap["mAP"], ap["AP50"], ap["AP75"], number_accuracy(gt_numbers(gt), labels))


def sweep(gt: dict, found: dict[int, Reading | Found | Detections], thresholds=THRESHOLDS) -> list[Metrics]:
    """Metrics at each threshold (the readings re-read per threshold; no model runs)."""
    coco, readings = _coco_gt(gt), _readings(found)
    return [evaluate(gt, readings, t, coco=coco) for t in thresholds]


def rank(row: Metrics | dict) -> tuple[float, float, float]:
    """How settings are ranked everywhere: higher accuracy, then higher mAP, then the lower threshold."""
    r = row if isinstance(row, dict) else asdict(row)
    return round(r.get("accuracy", 0.0), 6), round(r.get("mAP", 0.0), 6), -(r.get("threshold") or 0.0)


def best(rows: list) -> Metrics:
    """The best row (:func:`rank`)."""
    return max(rows, key=rank)


def write_table(rows: list[Metrics], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(r).items()})
    return path


def plot_sweep(curves: dict[str, list[Metrics]], path: str | Path | None = None, title: str = "Threshold sweep"):
    """mAP and accuracy against threshold, one colour per model, best threshold marked. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, rows), colour in zip(curves.items(), colours * 4):
        t = [r.threshold for r in rows]
        ax.plot(t, [r.accuracy for r in rows], "-", color=colour, label=f"{name} accuracy")
        ax.plot(t, [r.mAP for r in rows], "--", color=colour, label=f"{name} mAP")
        b = best(rows)
        ax.plot([b.threshold], [b.accuracy], "o", color=colour, ms=8)
        ax.annotate(f"{b.threshold:.2f}: {b.accuracy:.3f}", (b.threshold, b.accuracy), textcoords="offset points",
                    xytext=(4, 6), fontsize=8, color=colour)
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    if path:
        fig.savefig(path)
        plt.close(fig)
    return fig
