"""Reading a region's number at a threshold: the digits kept are assembled (:mod:`digit_demo.assemble`),
then judged in order by the other evidence the pipeline gathered (:class:`digit_demo.types.Found`):

1. :func:`by_line` - the number reader's reading of the line: another number the detections allow
   at another threshold, or the one its proposer read, replaces the threshold's where the line finds
   it likelier by the reader's tuned margin. So the number reader settles how many digits the number
   has, and which, and a second model with its own backbone proposes what the detector missed.
2. :func:`by_lead` - an ensemble's lead member: its own reading stands unless another member read the
   fused number alone and the fused line finds it likelier by LEAD_MARGIN; where the two agree, the
   number is as sure as the surer.
3. :func:`by_text` - a text recognizer's reading of the region's line (PP-OCR, where the locate stage
   ran it): its digits replace the readers' where it is surer of them than they are of theirs, and at
   least as sure as the locate stage asks (``TextReading.min_score``).
"""
from __future__ import annotations

import numpy as np

from .assemble import THRESHOLDS, assemble, dedupe, is_column
from .number_reader import line_log_prob
from .types import Detections, Found, HouseNumber, TextReading

# An ensemble's fused reading replaces its lead member's when another member reads it on its own and the
# fused line finds it more likely by this many nats. On valid (bfloat16 readings), over the 24 shipped
# ensembles (one size and two), the margin alone (4) kept 21 of them at or above their best member (3
# were 1-3 numbers short); with the other member's agreement, margins 4 / 5 / 6 keep all 24.
LEAD_MARGIN = 4.0


def read(found: Found, threshold: float, judge: bool = True) -> HouseNumber:
    """The number ``found`` reads at ``threshold``: assembled from the detections kept (:func:`at`),
    then, unless ``judge`` is False, judged by the line (:func:`by_line`); an ensemble's lead member's
    reading is weighed last (:func:`by_lead`, without the line where ``judge`` is False)."""
    number = at(found, threshold)
    if judge:
        number = by_line(found, number)
    number = by_lead(found, number, judge)
    return by_text(found, number) if judge else number


def at(found: Found, threshold: float) -> HouseNumber:
    """The number assembled from the detections scoring at least ``threshold``. Thresholds keeping the
    same detections read the same number, so it is read once per count kept (THRESHOLDS keep 3.3
    distinct sets per valid image on average) and remembered in ``found.memo``."""
    above = found.detections.scores >= threshold
    key = ("at", int(above.sum()))
    if key not in found.memo:
        found.memo[key] = assemble(found.detections, threshold)
    return found.memo[key]


def by_line(found: Found, number: HouseNumber) -> HouseNumber:
    """``number``, or the alternative (:func:`alternatives`) the line finds likelier by its margin."""
    if found.line is None:
        return number
    others, scores = alternatives(found)
    base = scores[number.text] if number.text in scores else float(line_log_prob(found.line.log_probs, [number.text])[0])
    best = max((t for t in others if t != number.text), key=scores.get, default=None)
    return others[best] if best is not None and scores[best] - base > found.line.margin else number


def alternatives(found: Found) -> tuple[dict[str, HouseNumber], dict[str, float]]:
    """The distinct numbers read at THRESHOLDS (the lowest threshold's reading of each) and the
    proposer's (:func:`proposed`), with the line's log-probability of each; computed once per region."""
    if "alternatives" not in found.memo:
        others: dict[str, HouseNumber] = {}
        for t in THRESHOLDS:
            number = at(found, t)
            if number.text:
                others.setdefault(number.text, number)
        if found.line.proposal is not None and len(found.line.proposal):
            number = proposed(found)
            others.setdefault(number.text, number)
        scores = dict(zip(others, line_log_prob(found.line.log_probs, list(others)).tolist())) if others else {}
        found.memo["alternatives"] = (others, scores)
    return found.memo["alternatives"]


def proposed(found: Found) -> HouseNumber:
    """The number the number reader's proposer reads, on the detected boxes (:func:`snapped`)."""
    return snapped(found.line.proposal, found)


def snapped(prop: Detections, found: Found) -> HouseNumber:
    """The number ``prop`` (digits placed by another reader) reads, each digit on the detected box it
    falls on (the box of the detection at the lowest of THRESHOLDS whose centre is nearest its own,
    within half its width and height; scored by the detection where it read the same digit) or, where
    none does, its placed box."""
    boxes, scores = prop.boxes.copy(), prop.scores.copy()
    kept = dedupe(found.detections.above(min(THRESHOLDS)))
    if len(kept) and len(prop):
        # P x F x (dx, dy) between the centres of the proposed and the detected digits
        gap = np.abs((prop.boxes[:, None, :2] + prop.boxes[:, None, 2:]) - (kept.boxes[None, :, :2] + kept.boxes[None, :, 2:])) / 2
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
        boxes[hit] = kept.boxes[near[hit]]
        same = hit & (kept.digits[near] == prop.digits)
        scores[same] = kept.scores[near[same]]
    digits = Detections(boxes, scores, prop.digits.copy())
    return HouseNumber("".join(str(int(d)) for d in prop.digits), digits, float(np.prod(scores)) if len(scores) else 0.0)


def by_text(found: Found, number: HouseNumber) -> HouseNumber:
    """``number``, or the text recognizer's digits where they differ and it is surer of them than the
    readers of ``number`` and at least ``min_score`` sure, or the readers misread the line's layout
    (:func:`misread`) and it is at least ``min_score_misread`` sure: each digit on a detected box where one
    lies under it (:func:`snapped`), else on its share of the recognized line, side by side (a line
    taller than wide, a vertical stack: top to bottom).
    The number's confidence is then the recognizer's score (where both read the same, the higher of
    the two)."""
    text = found.text
    if text is None or not text.digits:
        return number
    layout = text.digits != number.text and misread(text, number)
    if text.score < (text.min_score_misread if layout else text.min_score):
        return number
    if text.digits == number.text:  # two readers agree: as sure as the surer
        return HouseNumber(number.text, number.digits, max(number.confidence, text.score))
    if number.text and number.confidence >= text.score and not layout:  # the surer reader's number stands
        return number
    n = len(text.digits)
    x1, y1, x2, y2 = text.box
    k = np.arange(n, dtype=np.float32)
    if text.stacked:
        step = (y2 - y1) / n
        boxes = np.stack([np.full(n, x1), y1 + k * step, np.full(n, x2), y1 + (k + 1) * step], 1)
    else:
        step = (x2 - x1) / n
        boxes = np.stack([x1 + k * step, np.full(n, y1), x1 + (k + 1) * step, np.full(n, y2)], 1)
    placed = Detections(boxes.astype(np.float32), np.full(n, text.score, np.float32),
                        np.array([int(c) for c in text.digits], np.int64))
    read = snapped(placed, found)
    return HouseNumber(read.text, read.digits, text.score)


def misread(text: TextReading, number: HouseNumber) -> bool:
    """Whether the readers' ``number`` misreads a line whose layout the recognizer read and they were
    not made for: a vertical stack (:attr:`TextReading.stacked`; the readers read rows) where they read
    fewer than two digits, or a number with a letter suffix (:attr:`TextReading.suffix`, "502C") that
    they read as the recognizer's digits and more (the letter taken for a digit)."""
    if text.stacked:
        box = np.asarray(text.box, np.float32)
        centres = (number.digits.boxes[:, :2] + number.digits.boxes[:, 2:]) / 2
        return int(((centres >= box[:2]) & (centres <= box[2:])).all(1).sum()) < 2
    return bool(text.suffix) and len(number.text) > len(text.digits) and number.text.startswith(text.digits)


def by_lead(found: Found, number: HouseNumber, judged: bool = True) -> HouseNumber:
    """An ensemble's reading: ``number`` (read from the fused digits) or its lead member's own.

    The lead's reading stands unless ``number`` is what another member reads on its own and the fused
    line (when ``judged``) finds it more likely by LEAD_MARGIN nats. So fusing can add a digit the lead
    missed where another member saw it, but not trade the best member's right reading for a worse one.
    Where both read the same number, it is as sure as the surer of the two: fused scores are lower than a
    lone model's (a box not every member found keeps that share of its score), and the bars they meet
    (PP-OCR overruling, a region's rank in a photo) were set on a lone model's."""
    lead = found.lead
    if lead is None or not lead.number.text:
        return number
    if lead.number.text == number.text:  # the fused digits and the lead agree: as sure as the surer
        return HouseNumber(number.text, number.digits, max(number.confidence, lead.number.confidence))
    if not number.text or found.line is None or not judged or number.text not in lead.others:
        return lead.number
    fused, alone = line_log_prob(found.line.log_probs, [number.text, lead.number.text])
    return number if fused - alone > LEAD_MARGIN else lead.number
