"""What a pipeline reads: each image's regions and their raw detections, re-read at any threshold
without running a model (:class:`Reading`, :class:`Readings`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image

from .judge import read
from .types import Detections, Found, HouseNumber, TextReading


@dataclass
class RegionReading:
    """One place a house number is read: the located ``box`` and its ``score``, the ``crop`` (x1, y1,
    x2, y2) read around it at full resolution, and what the models found there (``raw``, in the crop's
    pixels; :meth:`number` and :meth:`kept` give them in the photo's). An image read whole (a crop, or
    a photo where nothing was located) is one region covering it (``whole``: box and crop are the
    image, score 1). Regions rank by their number's confidence times ``score ** rank_power`` (the
    locator's tuned power)."""

    box: np.ndarray
    score: float
    crop: tuple[int, int, int, int]
    raw: Found | None = None
    rank_power: float = 0.0
    whole: bool = False
    text: TextReading | None = None  # a text recognizer's reading of the region's line, in the crop's pixels

    @classmethod
    def covering(cls, width: int, height: int, raw: Found | None = None) -> "RegionReading":
        """The region of an image read whole."""
        return cls(np.array([0, 0, width, height], np.float32), 1.0, (0, 0, width, height), raw, whole=True)

    def rank(self, number: HouseNumber) -> tuple[bool, float]:
        return bool(number.text), number.confidence * self.score**self.rank_power

    def number(self, threshold: float) -> HouseNumber:
        if self.raw is None:
            return HouseNumber("", Detections(), 0.0)
        return read(self.raw, threshold).shifted(self.crop[0], self.crop[1])

    def kept(self, threshold: float) -> Detections:
        return Detections() if self.raw is None else self.raw.detections.above(threshold).shifted(self.crop[0], self.crop[1])


@dataclass
class Reading:
    """One image read by a pipeline: its ``name``, the decoded ``image`` (None unless kept), and the
    ``regions`` read in it (one covering the image where it was read whole); ``error`` says why where
    the image could not be read (then there are no regions)."""

    name: str
    image: Image.Image | None = None
    error: str | None = None
    regions: list[RegionReading] = field(default_factory=list)

    @classmethod
    def of(cls, name: str, raw: Found | Detections, image: Image.Image | None = None) -> "Reading":
        """The reading of an image read whole (kept as ``image`` where given), from what was found in it
        (detections alone: a detector without the later stages)."""
        found = raw if isinstance(raw, Found) else Found(raw)
        return cls(name, image, regions=[RegionReading.covering(*(image.size if image else (0, 0)), found)])

    @property
    def located(self) -> bool:
        """Whether numbers were located in the image (it was not read whole)."""
        return any(not r.whole for r in self.regions)

    def numbers(self, threshold: float) -> list[tuple[RegionReading, HouseNumber]]:
        """Every number read at ``threshold``, with its region, in photo pixels; most confident first."""
        found = [(r, r.number(threshold)) for r in self.regions]
        return sorted(found, key=lambda rn: rn[0].rank(rn[1]), reverse=True)

    def number(self, threshold: float) -> HouseNumber:
        """The house number at ``threshold``: the most confident one where several were located (the
        empty number where the image could not be read)."""
        found = self.numbers(threshold)
        return found[0][1] if found else HouseNumber("", Detections(), 0.0)

    def kept(self, threshold: float) -> Detections:
        """Every detection scoring at least ``threshold``, in every region, in the photo's pixels (what
        ``pred.json`` holds)."""
        return Detections.concat([r.kept(threshold) for r in self.regions])


@dataclass
class Readings:
    """The readings of a batch of images, in order, and the pipeline's ``threshold``."""

    items: list[Reading] = field(default_factory=list)
    threshold: float = 0.5

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Reading]:
        return iter(self.items)

    def __getitem__(self, k: int) -> Reading:
        return self.items[k]

    def at(self, threshold: float | None = None) -> list[HouseNumber]:
        """Each image's house number at ``threshold`` (default: the pipeline's); runs no model."""
        t = self.threshold if threshold is None else threshold
        return [r.number(t) for r in self.items]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.items if r.error]
