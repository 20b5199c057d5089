"""From digit detections to a whole house number."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import nms

from .ensemble import prefer_lead
from .number_reader import LINE_MARGIN, line_log_prob
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
             max_gap: float | None = MAX_GAP, judge: bool = True) -> HouseNumber:
    """Read the house number from raw detections at a confidence ``threshold``.

    Digits on the same spot are deduplicated, strays dropped (``strays``), the rest read in order,
    and only the main group kept where a gap wider than ``max_gap`` digit heights splits them
    (``None``: keep all). Confidence is the product of the digit scores (every digit must be right
    for the number to be).

    Where the detections carry the number reader's ``line``, the numbers read at the other
    thresholds of ``THRESHOLDS``, and the proposer's reading (:func:`proposed`), are its
    alternatives: one the line reading finds more likely by ``dets.line_margin`` nats (the number
    reader's tuned margin, default LINE_MARGIN) replaces it (unless ``judge`` is False). So the number reader judges how many digits the number has, and which, and a
    second model with its own backbone proposes what the detector missed.

    An ensemble's detections carry its most accurate member's reading (``lead``), which stands
    unless :func:`digit_demo.ensemble.prefer_lead` finds the fused reading better.
    """
    number = _assemble(dets, threshold, dedupe_iou, strays, max_gap)
    if dets.line is not None and judge:
        margin = LINE_MARGIN if dets.line_margin is None else dets.line_margin
        others, scores = _line_readings(dets, dedupe_iou, strays, max_gap)
        base = scores[number.text] if number.text in scores else float(line_log_prob(dets.line, [number.text])[0])
        best = max((t for t in others if t != number.text), key=scores.get, default=None)
        if best is not None and scores[best] - base > margin:
            number = others[best]
    return number if dets.lead is None else prefer_lead(number, dets, judge)


def _line_readings(dets: Detections, dedupe_iou: float, strays: bool, max_gap: float | None
                   ) -> tuple[dict[str, HouseNumber], dict[str, float]]:
    """The distinct numbers read at THRESHOLDS (the lowest threshold's reading of each) and the
    line's log-probability of each; computed once per detections, so a threshold sweep or a slider
    move only re-reads at its own threshold."""
    key = (dedupe_iou, strays, max_gap)
    if key not in dets._readings:
        others: dict[str, HouseNumber] = {}
        for t in THRESHOLDS:
            number = _assemble(dets, t, dedupe_iou, strays, max_gap)
            if number.text:
                others.setdefault(number.text, number)
        if dets.proposal is not None and len(dets.proposal):
            number = proposed(dets, dedupe_iou)
            others.setdefault(number.text, number)
        scores = dict(zip(others, line_log_prob(dets.line, list(others)).tolist())) if others else {}
        dets._readings[key] = (others, scores)
    return dets._readings[key]


def proposed(dets: Detections, dedupe_iou: float = DEDUPE_IOU) -> HouseNumber:
    """The number ``dets.proposal`` reads, each digit on the detected box it falls on (the box of
    the detection at the lowest of THRESHOLDS whose centre is nearest its own, within half its
    width and height; scored by the detection where it read the same digit) or, where none does, its
    placed box."""
    prop = dets.proposal
    boxes, scores = prop.boxes.copy(), prop.scores.copy()
    found = dedupe(dets.above(min(THRESHOLDS)), dedupe_iou)
    if len(found):
        # P x F x (dx, dy) between the centres of the proposed and the detected digits
        gap = np.abs((prop.boxes[:, None, :2] + prop.boxes[:, None, 2:]) - (found.boxes[None, :, :2] + found.boxes[None, :, 2:])) / 2
        half = (prop.boxes[:, 2:] - prop.boxes[:, :2])[:, None] / 2
        dx = np.where((gap <= half).all(2), gap[..., 0], np.inf)
        near = dx.argmin(1)
        closest = dx[np.arange(len(prop)), near]
        hit = np.isfinite(closest)
        taken = set()
        for k in np.argsort(closest, kind="stable"):  # a detected box holds one digit: the proposed digit nearest it
            if hit[k] and near[k] in taken:
                hit[k] = False
            elif hit[k]:
                taken.add(near[k])
        boxes[hit] = found.boxes[near[hit]]
        same = hit & (found.digits[near] == prop.digits)
        scores[same] = found.scores[near[same]]
    digits = Detections(boxes, scores, prop.digits.copy())
    return HouseNumber("".join(str(int(d)) for d in prop.digits), digits, float(np.prod(scores)))


def _assemble(dets: Detections, threshold: float, dedupe_iou: float, strays: bool, max_gap: float | None) -> HouseNumber:
    """The number read from the detections scoring at least ``threshold``. Thresholds keeping the same
    detections read the same number, so it is read once per count kept (the 19 THRESHOLDS keep
    3.3 distinct sets per valid image on average) and remembered on ``dets``."""
    above = dets.scores >= threshold
    key = (int(above.sum()), dedupe_iou, strays, max_gap)
    if key not in dets._numbers:
        dets._numbers[key] = _read(dets.select(above), dedupe_iou, strays, max_gap)
    return dets._numbers[key]


def _read(dets: Detections, dedupe_iou: float, strays: bool, max_gap: float | None) -> HouseNumber:
    kept = dedupe(dets, dedupe_iou)
    if strays:
        kept = drop_strays(kept)
    kept = reading_order(kept)
    if max_gap is not None:
        kept = main_group(kept, max_gap)
    if not len(kept):
        return HouseNumber("", kept, 0.0)
    text = "".join(str(int(d)) for d in kept.digits)
    return HouseNumber(text, kept, float(np.prod(kept.scores)))
