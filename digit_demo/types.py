"""The data every stage passes on: one image's digit detections, and the house number read from them."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detections:
    """Detections of one image: ``boxes`` xyxy in original pixels, ``scores``, ``digits`` 0-9, the
    number reader's reading of the line they sit on (``line``: T x 11 log-probabilities, blank last)
    and the number its proposer reads there (``proposal``: digits placed on the line, scored by
    their peak probability); both None without them (:func:`digit_demo.pipeline.read_number_line`). An
    ensemble's detections also carry its lead member's own reading (``lead``) and the numbers its
    other members read on their own (``others``; :meth:`digit_demo.pipeline.Pipeline.combine`)."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    digits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    line: np.ndarray | None = None
    proposal: "Detections | None" = None
    lead: "HouseNumber | None" = None
    others: tuple[str, ...] = ()
    # how many nats more likely under ``line`` another reading must be to replace the threshold's (the
    # number reader's tuned margin; None: :data:`digit_demo.number_reader.LINE_MARGIN`)
    line_margin: float | None = None
    # the numbers read at each of THRESHOLDS and the line's log-probability of each (see assemble)
    _readings: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # the number read from each set of detections a threshold keeps (see _assemble)
    _numbers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep) -> "Detections":
        return Detections(self.boxes[keep], self.scores[keep], self.digits[keep], self.line, self.proposal, self.lead,
                          self.others, self.line_margin)

    def above(self, threshold: float) -> "Detections":
        return self.select(self.scores >= threshold)

    def shifted(self, dx: float, dy: float) -> "Detections":
        """The boxes, scores and digits moved by (``dx``, ``dy``) pixels (a crop's to its photo's)."""
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
