"""The data every stage passes on: digit detections, what the models found in one region, and the
house number read from them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detections:
    """Digit detections: ``boxes`` xyxy in pixels, ``scores``, ``digits`` 0-9."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    digits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep) -> "Detections":
        return Detections(self.boxes[keep], self.scores[keep], self.digits[keep])

    def above(self, threshold: float) -> "Detections":
        return self.select(self.scores >= threshold)

    def shifted(self, dx: float, dy: float) -> "Detections":
        """The detections moved by (``dx``, ``dy``) pixels (a crop's to its photo's)."""
        return Detections((self.boxes + np.array([dx, dy, dx, dy], np.float32)).astype(np.float32), self.scores,
                          self.digits)

    @staticmethod
    def concat(parts: "list[Detections]") -> "Detections":
        """The boxes, scores and digits of ``parts`` together."""
        if not parts:
            return Detections()
        return Detections(np.concatenate([d.boxes for d in parts]).astype(np.float32).reshape(-1, 4),
                          np.concatenate([d.scores for d in parts]).astype(np.float32),
                          np.concatenate([d.digits for d in parts]).astype(np.int64))


@dataclass
class HouseNumber:
    """An assembled number: its text ("" when nothing was read), the digits used, in reading order."""

    text: str
    digits: Detections
    confidence: float

    def shifted(self, dx: float, dy: float) -> "HouseNumber":
        """The same number with its digits' boxes moved by (``dx``, ``dy``) pixels."""
        return HouseNumber(self.text, self.digits.shifted(dx, dy), self.confidence)

    @property
    def label(self) -> int:
        """The number as ``pred.csv`` writes it: -1 when no digit was found."""
        return int(self.text) if self.text else -1


@dataclass
class LineReading:
    """The number reader's reading of the line the digits sit on: T x 11 ``log_probs`` (blank last),
    the ``margin`` in nats by which another reading must be likelier to replace the threshold's (its
    tuned value), and the number its proposer reads there (``proposal``: digits placed on the line,
    scored by their peak probability; None where it was not asked)."""

    log_probs: np.ndarray
    margin: float
    proposal: Detections | None = None


@dataclass
class LeadReading:
    """An ensemble's most accurate member's own ``number`` (at its own threshold) and the numbers its
    other members read alone (``others``)."""

    number: HouseNumber
    others: tuple[str, ...] = ()


@dataclass
class TextReading:
    """What a text recognizer (PP-OCR) read on a region's line: its ``digits``, how sure it is
    (``score``), the line's ``box`` (xyxy, in the region crop's pixels), how sure it must be to
    overrule the readers there (``min_score``; ``min_score_misread`` where they misread the line's
    layout, :func:`digit_demo.judge.misread`; both set by the locate stage) and the whole ``line`` it
    read, letters included ("502C" where ``digits`` is "502")."""

    digits: str
    score: float
    box: tuple[float, float, float, float]
    min_score: float = 0.5
    line: str = ""
    min_score_misread: float = 0.5

    @property
    def stacked(self) -> bool:
        """Whether the line is a vertical stack: two digits or more in a box over 1.5 times taller than wide."""
        x1, y1, x2, y2 = self.box
        return len(self.digits) > 1 and (y2 - y1) > 1.5 * (x2 - x1)

    @property
    def suffix(self) -> str:
        """The letter right after the digits ("12A" → "A"): one capital letter (or a small one shaped as
        its capital: c, k, p, u, v, w, x) that no digit resembles (not O, D, I, L, Z, S, G, T, B, which a
        recognizer reads for 0, 1, 2, 5, 6, 7, 8); else ""."""
        m = re.search(re.escape(self.digits) + r"([A-Za-z])(?![A-Za-z])", self.line) if self.digits else None
        return m.group(1) if m and m.group(1) in SUFFIXES else ""


# Letters that follow a house number as its suffix and that no digit resembles.
SUFFIXES = "ACEFHJKMNPRUVWXY" + "ckpuvwx"


@dataclass
class Found:
    """What the models found in one image region: its digit ``detections`` and, where those stages ran,
    the number reader's ``line``, an ensemble's ``lead`` and a text recognizer's reading of the region's
    line (``text``). :func:`digit_demo.judge.read` reads the
    number at any threshold; what it reads is remembered here (``memo``), so a sweep or a slider move
    reads each set of kept detections once."""

    detections: Detections = field(default_factory=Detections)
    line: LineReading | None = None
    lead: LeadReading | None = None
    text: TextReading | None = None
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # a copy starts its own
