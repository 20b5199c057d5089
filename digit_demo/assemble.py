"""From digit detections to a whole house number."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import nms

from .types import Detections, HouseNumber

# Distinct digits barely overlap: in train.json, 99.7% of multi-digit images have no two digit boxes
# with IoU above 0.3 (99th percentile 0.24). Boxes overlapping more are one digit read twice.
DEDUPE_IOU = 0.35


def dedupe(dets: Detections, iou: float = DEDUPE_IOU) -> Detections:
    """Keep the best-scoring box where boxes (of any digits) sit on the same spot."""
    if len(dets) < 2:
        return dets
    keep = nms(torch.from_numpy(dets.boxes).float(), torch.from_numpy(dets.scores).float(), iou).numpy()
    return dets.select(np.sort(keep))


def drop_strays(dets: Detections, min_height: float = 0.55, max_offset: float = 0.75) -> Detections:
    """Drop boxes far smaller than, or off the line of, the confident digits.

    The reference line is the score-weighted median height and centre of the boxes scoring at
    least half the best score. A box is stray if it is shorter than ``min_height`` x that height,
    or its centre is further than ``max_offset`` x that height from the line (across the line's
    direction: vertically for a row, horizontally for a column).
    """
    if len(dets) < 2:
        return dets
    b = dets.boxes
    h = b[:, 3] - b[:, 1]
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    core = dets.scores >= dets.scores.max() / 2
    ref_h = float(np.median(h[core]))
    vertical = is_column(b[core])
    offset = np.abs(cx - np.median(cx[core])) if vertical else np.abs(cy - np.median(cy[core]))
    keep = (h >= min_height * ref_h) & (offset <= max_offset * ref_h)
    keep |= dets.scores == dets.scores.max()
    return dets.select(keep)


# Digits of one number sit close together: in train.json the gap between neighbouring digits is
# under 0.39 of their height in 99.5% of cases. A wider gap (with slack for predicted boxes)
# separates two numbers, e.g. a neighbour's number or a stray digit on the same line.
MAX_GAP = 0.6


def main_group(dets: Detections, max_gap: float = MAX_GAP) -> Detections:
    """Split reading-ordered ``dets`` where neighbours are more than ``max_gap`` x the digit height
    apart and keep the group with the highest total score."""
    if len(dets) < 2:
        return dets
    b = dets.boxes
    lo, hi = (b[:, 1], b[:, 3]) if is_column(b) else (b[:, 0], b[:, 2])
    height = float(np.median(b[:, 3] - b[:, 1]))
    starts = np.flatnonzero(lo[1:] - hi[:-1] > max_gap * height) + 1
    groups = np.split(np.arange(len(dets)), starts)
    return dets.select(max(groups, key=lambda g: dets.scores[g].sum()))


def is_column(boxes: np.ndarray) -> bool:
    """True when boxes stack top to bottom (a vertical house number) rather than left to right."""
    if len(boxes) < 2:
        return False
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w = np.median(boxes[:, 2] - boxes[:, 0])
    h = np.median(boxes[:, 3] - boxes[:, 1])
    return np.ptp(cx) < 0.5 * w and np.ptp(cy) > 0.8 * h


def reading_order(dets: Detections) -> Detections:
    """Sort left to right; a vertical stack reads top to bottom."""
    if len(dets) < 2:
        return dets
    b = dets.boxes
    key = (b[:, 1] + b[:, 3]) if is_column(b) else (b[:, 0] + b[:, 2])
    return dets.select(np.argsort(key, kind="stable"))


# The confidence thresholds every sweep reads at, and the number reader's alternatives are read at.
THRESHOLDS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2).tolist())


def assemble(dets: Detections, threshold: float = 0.5, dedupe_iou: float = DEDUPE_IOU, strays: bool = True,
             max_gap: float | None = MAX_GAP) -> HouseNumber:
    """The house number the detections scoring at least ``threshold`` read.

    Digits on the same spot are deduplicated, strays dropped (``strays``), the rest read in order,
    and only the main group kept where a gap wider than ``max_gap`` digit heights splits them
    (``None``: keep all). Confidence is the product of the digit scores (every digit must be right
    for the number to be). The other evidence a pipeline gathers judges this number afterwards
    (:func:`digit_demo.judge.read`).
    """
    kept = dedupe(dets.above(threshold), dedupe_iou)
    if strays:
        kept = drop_strays(kept)
    kept = reading_order(kept)
    if max_gap is not None:
        kept = main_group(kept, max_gap)
    if not len(kept):
        return HouseNumber("", kept, 0.0)
    text = "".join(str(int(d)) for d in kept.digits)
    return HouseNumber(text, kept, float(np.prod(kept.scores)))
