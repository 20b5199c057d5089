"""The reading pipeline: the one place that knows the order of the stages.

``Pipeline(PipelineConfig(...)).read(images)`` runs, per image: load (:mod:`digit_demo.images`),
locate the house numbers in a whole photo (:mod:`digit_demo.locator`; a photo under
MIN_PHOTO_SIDE on its short side is a crop and is read whole), then, on each located region's crop at
full resolution or on the whole crop, detect with each member (:class:`digit_demo.detect.Detector`, which also re-reads every spot with
the digit reader), fuse the members (:mod:`digit_demo.ensemble`), read the whole number's line
(:mod:`digit_demo.number_reader`), and keeps the raw detections; ``readings.at(threshold)`` then
assembles the numbers (:func:`digit_demo.assemble.assemble`) at any threshold without running a
model again. The app, the CLI, the benchmark and the trainers that run a detector all build one.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .assemble import LINE_THRESHOLDS, assemble, is_column
from .calibration import threshold_for
from .checkpoints import DEFAULT_MODEL
from .detect import Detector, to_tensor
from .ensemble import DEFAULT_FUSION, FUSIONS, ensemble_key, fuse, member_threshold, member_weights
from .images import ImageError, ImageInput, decode, load_image
from .inference import has_amx, inference_precision
from .locator import (DEFAULT_LOCATOR, INPUT_SIDE, MIN_PHOTO_SIDE, Locator, input_size, locate, optional_locator, reading_box,
                      widened_box)
from .number_reader import (DEFAULT_NUMBER_READER, DEFAULT_PROPOSER, NumberReader, optional_number_reader,
                            read_region)
from .reader import DEFAULT_READER, DigitReader, optional_reader
from .types import Detections, HouseNumber


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides what a pipeline reads: its detector ``models`` (several: an ensemble
    fused by ``fusion``), which second stages run (a checkpoint name or path, or None), whether each
    photo is also read at a larger size (``multi_scale``), the inference ``precision`` ("auto",
    "fp32" or "bf16"; resolved to fp32 or bf16 on this machine) and the confidence ``threshold``
    (None: the one calibrated for this configuration, :func:`digit_demo.calibration.threshold_for`).

    The number reader needs the digit reader's scores and the proposer the number reader, so turning
    one off turns off those after it. ``key`` names the configuration as benchmarks, sweeps and the
    app do."""

    models: tuple[str, ...] = (DEFAULT_MODEL,)
    fusion: str = DEFAULT_FUSION
    fusion_iou: float = 0.55
    digit_reader: str | None = DEFAULT_READER
    number_reader: str | None = DEFAULT_NUMBER_READER
    proposer: str | None = DEFAULT_PROPOSER
    multi_scale: bool = False
    precision: str | None = None
    threshold: float | None = None
    batch_size: int = 8
    locator: str | None = DEFAULT_LOCATOR

    def __post_init__(self):
        models = (self.models,) if isinstance(self.models, (str, Path)) else self.models
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("models", tuple(str(m) for m in models) or (DEFAULT_MODEL,))
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold {self.threshold} is not between 0 and 1")
        set_("precision", inference_precision(self.precision))
        if self.digit_reader is None:
            set_("number_reader", None)
        if self.number_reader is None:
            set_("proposer", None)

    @property
    def names(self) -> tuple[str, ...]:
        """The members' checkpoint names (a path's file stem)."""
        return tuple(Path(m).stem for m in self.models)

    def key_for(self, models: Sequence[str] | None = None, multi_scale: bool | None = None,
                fp32: bool | None = None) -> str:
        """The key of this configuration with its members named as ``models`` (in that order), read at
        two sizes or one, in float32 or not (defaults: this configuration's own)."""
        return ensemble_key(list(models or self.names), self.fusion, self.digit_reader is not None,
                            self.multi_scale if multi_scale is None else multi_scale,
                            self.number_reader is not None, self.proposer is not None,
                            (self.precision == "fp32" and has_amx()) if fp32 is None else fp32)

    @property
    def key(self) -> str:
        return self.key_for()


class ModelCache:
    """Loaded, inference-ready networks, shared by every pipeline built with this cache (the app's
    visitors share one); safe to use from several threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[tuple, object] = {}

    def _get(self, key: tuple, load):
        with self._lock:
            if key not in self._models:
                self._models[key] = load()
            return self._models[key]

    def detector(self, name: str, precision: str) -> tuple[torch.nn.Module, dict]:
        def load():
            loaded = Detector.load(name, precision=precision)
            return loaded.model, loaded.meta
        return self._get(("detector", name, precision), load)

    def digit_reader(self, name: str | None, precision: str) -> DigitReader | None:
        return self._get(("reader", name, precision), lambda: optional_reader(name, precision))

    def number_reader(self, name: str | None, proposer: str | None, precision: str) -> NumberReader | None:
        return self._get(("number_reader", name, proposer, precision),
                         lambda: optional_number_reader(name, proposer, precision))

    def locator(self, name: str | None, precision: str) -> Locator | None:
        return self._get(("locator", name, precision), lambda: optional_locator(name, precision))


DEFAULT_CACHE = ModelCache()


@dataclass
class RegionReading:
    """One house number located in a whole photo: the located ``box`` and its ``score``, the ``crop``
    (x1, y1, x2, y2) read around it at full resolution, and the raw detections there (``raw``, in the
    crop's pixels; :meth:`number` and :meth:`kept` give them in the photo's). Regions rank by their
    number's confidence times ``score ** rank_power`` (the locator's tuned power)."""

    box: np.ndarray
    score: float
    crop: tuple[int, int, int, int]
    raw: Detections | None = None
    rank_power: float = 0.0

    def rank(self, number: HouseNumber) -> tuple[bool, float]:
        return bool(number.text), number.confidence * self.score**self.rank_power

    def number(self, threshold: float) -> HouseNumber:
        if self.raw is None:
            return HouseNumber("", Detections(), 0.0)
        return assemble(self.raw, threshold).shifted(self.crop[0], self.crop[1])

    def kept(self, threshold: float) -> Detections:
        return Detections() if self.raw is None else self.raw.above(threshold).shifted(self.crop[0], self.crop[1])


@dataclass
class Reading:
    """One image read by a pipeline: its ``name``, the decoded ``image`` (None unless kept), and either
    the raw detections of the whole image (``raw``) or, for a whole photo, each located number's
    (``regions``); ``error`` says why where the image could not be read (then both are empty)."""

    name: str
    raw: Detections | None = None
    image: Image.Image | None = None
    error: str | None = None
    regions: list[RegionReading] = field(default_factory=list)

    def numbers(self, threshold: float) -> list[tuple[RegionReading | None, HouseNumber]]:
        """Every number read at ``threshold``, with its region (None for an image read whole), in
        photo pixels; most confident first."""
        if self.regions:
            found = [(r, r.number(threshold)) for r in self.regions]
            return sorted(found, key=lambda rn: rn[0].rank(rn[1]), reverse=True)
        if self.raw is None:
            return []
        return [(None, assemble(self.raw, threshold))]

    def number(self, threshold: float) -> HouseNumber:
        """The house number at ``threshold``: the most confident one where several were located (the
        empty number where the image could not be read)."""
        found = self.numbers(threshold)
        return found[0][1] if found else HouseNumber("", Detections(), 0.0)

    def kept(self, threshold: float) -> Detections:
        """Every detection scoring at least ``threshold``, in every region, in the photo's pixels (what
        ``pred.json`` holds)."""
        if self.regions:
            return Detections.concat([r.kept(threshold) for r in self.regions])
        return self.raw.above(threshold) if self.raw is not None else Detections()


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

    @property
    def raw(self) -> list[Detections | None]:
        """Each image's raw detections (None where it could not be read)."""
        return [r.raw for r in self.items]


class Pipeline:
    """Images in, house numbers out, for one :class:`PipelineConfig`.

    >>> pipe = Pipeline()                       # the shipped default, offline, on the CPU
    >>> readings = pipe.read(["house.jpg"])
    >>> readings.at()[0].text                   # at the calibrated threshold; .at(0.6) at another
    """

    def __init__(self, config: PipelineConfig | None = None, cache: ModelCache | None = None):
        self.config = config = config or PipelineConfig()
        cache = cache or DEFAULT_CACHE
        self.digit_reader = cache.digit_reader(config.digit_reader, config.precision)
        self.number_reader = cache.number_reader(config.number_reader, config.proposer, config.precision)
        self.locator = cache.locator(config.locator, config.precision)
        self.members = [Detector(*cache.detector(m, config.precision), batch_size=config.batch_size,
                                 reader=self.digit_reader, multi_scale=config.multi_scale) for m in config.models]
        self.weights = member_weights([m.meta for m in self.members])
        self.member_thresholds = [member_threshold(m.meta, config.multi_scale) for m in self.members]
        self.threshold = config.threshold if config.threshold is not None else threshold_for(config)

    @property
    def name(self) -> str:
        return self.config.key

    def detect_tensors(self, tensors: Sequence[torch.Tensor]) -> list[Detections]:
        """Each image's raw detections (float CHW tensors in [0, 1]), with the number reader's reading
        of their line; an ensemble's fused, with its members' own readings (:meth:`combine`)."""
        per_member = [m.detect_tensors(tensors) for m in self.members]
        if len(self.members) == 1:
            return self.with_lines(tensors, per_member[0])
        return self.combine(tensors, per_member)

    def with_lines(self, tensors: Sequence[torch.Tensor], found: Sequence[Detections]) -> list[Detections]:
        """``found`` with the number reader's reading of each image's line (unchanged without one, or
        where a line has been read already)."""
        if self.number_reader is None:
            return list(found)
        return [read_number_line(self.number_reader, t, d) if d.line is None else d for t, d in zip(tensors, found)]

    def combine(self, tensors: Sequence[torch.Tensor], per_member: Sequence[Sequence[Detections]]) -> list[Detections]:
        """Fuse the members' detections of ``tensors`` (``per_member[m][i]`` for image ``i``) by the
        configured fusion, with the number reader's reading of the fused digits' line, the number the
        lead member (the largest weight: the most accurate) reads alone at its own threshold
        (``Detections.lead``) and the numbers the other members read alone (``Detections.others``);
        :func:`digit_demo.assemble.assemble` weighs them (:func:`digit_demo.ensemble.prefer_lead`).
        Members' lines are read here unless their detections carry them already."""
        c = self.config
        fused = self.with_lines(tensors, [fuse(list(d), c.fusion, c.fusion_iou, self.weights, self.member_thresholds)
                                          for d in zip(*per_member)])
        alone = [[assemble(d, **({} if t is None else {"threshold": t})) for d in self.with_lines(tensors, found)]
                 for found, t in zip(per_member, self.member_thresholds)]
        lead = int(np.argmax(self.weights))
        rest = [a for m, a in enumerate(alone) if m != lead]
        return [replace(f, lead=alone[lead][i], others=tuple(r[i].text for r in rest)) for i, f in enumerate(fused)]

    def _detect_each(self, names: list[str], tensors: list[torch.Tensor]) -> list[tuple[Detections | None, str | None]]:
        """Detections for a batch; where the batch fails, image by image, so one image's failure is
        its own error line and not the batch's."""
        try:
            return [(d, None) for d in self.detect_tensors(tensors)]
        except Exception:
            if len(tensors) == 1:
                raise
        out: list[tuple[Detections | None, str | None]] = []
        for name, t in zip(names, tensors):
            try:
                out.append((self.detect_tensors([t])[0], None))
            except Exception as e:  # any failure on one image: say which, and read the others
                out.append((None, f"{name}: could not be read ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"))
        return out

    def locate(self, src: ImageInput, name: str) -> tuple[Image.Image, list[tuple]]:
        """The full-resolution image and the house numbers located in it, as (region, crop box) pairs;
        none for a crop (short side under MIN_PHOTO_SIDE), without a locator, or where none is found
        (the image is then read whole). The locator reads a JPEG decoded at a reduced scale."""
        if self.locator is None:
            return load_image(src, name), []
        seen = decode(src, name, draft_side=INPUT_SIDE)
        full = seen.image if not seen.reduced else load_image(src, name)
        if min(seen.size) < MIN_PHOTO_SIDE:
            return full, []
        small = seen.image.resize(input_size(*seen.size), Image.BILINEAR)
        regions = locate(self.locator, to_tensor(small), full.size)
        return full, [(r, reading_box(r.box, *full.size, self.locator.pad)) for r in regions]

    def _widen(self, jobs: list[tuple["Reading", "RegionReading | None", torch.Tensor]]) -> None:
        """Read again, wider, each located region whose number (at the pipeline's threshold) reaches
        its crop's left or right side (:func:`digit_demo.locator.widened_box`): the region cut it short."""
        if self.locator is None or self.locator.widen is None:
            return
        again = []
        for reading, region, _ in jobs:
            if region is None or region.raw is None or reading.error or reading.image is None:
                continue
            digits = assemble(region.raw, self.threshold, judge=False).digits.boxes
            crop = widened_box(region.crop, digits, *reading.image.size, *self.locator.widen, self.locator.pad)
            if crop is not None:
                again.append((region, crop, to_tensor(reading.image.crop(crop))))
        if not again:
            return
        found = self._detect_each([f"region {c}" for _, c, _ in again], [t for _, _, t in again])
        for (region, crop, _), (raw, error) in zip(again, found):
            if error is None:
                region.crop, region.raw = crop, raw

    def read_iter(self, sources: Iterable[ImageInput], names: Iterable[str] | None = None,
                  keep_images: bool = False) -> Iterator[Reading]:
        """Read ``sources`` (paths, bytes, PIL images or arrays) in batches of the configured size,
        yielding one :class:`Reading` per source, in order; an image that cannot be loaded or read
        gets a reading with an ``error`` naming it, and the rest are read."""
        sources = list(sources)
        names = list(names) if names is not None else [_name(s, k) for k, s in enumerate(sources, 1)]
        step = self.config.batch_size
        for i in range(0, len(sources), step):
            batch: list[Reading] = []
            jobs: list[tuple[Reading, RegionReading | None, torch.Tensor]] = []
            for src, name in zip(sources[i : i + step], names[i : i + step]):
                reading = Reading(name)
                batch.append(reading)
                try:
                    image, located = self.locate(src, name)
                except ImageError as e:
                    reading.error = str(e)
                    continue
                reading.image = image
                if not located:
                    jobs.append((reading, None, to_tensor(image)))
                for region, crop in located:
                    reading.regions.append(RegionReading(region.box, region.score, crop, rank_power=self.locator.rank_power))
                    jobs.append((reading, reading.regions[-1], to_tensor(image.crop(crop))))
            if jobs:
                found = self._detect_each([r.name for r, _, _ in jobs], [t for _, _, t in jobs])
                for (reading, region, _), (raw, error) in zip(jobs, found):
                    if error:
                        reading.error, reading.raw, reading.regions = error, None, []
                    elif region is None:
                        reading.raw = raw
                    elif not reading.error:
                        region.raw = raw
                self._widen(jobs)
            for reading in batch:
                if not keep_images or reading.error:
                    reading.image = None
            yield from batch

    def read(self, sources: Iterable[ImageInput], names: Iterable[str] | None = None,
             keep_images: bool = True) -> Readings:
        """Read every image (:meth:`read_iter`); the readings keep the decoded images by default."""
        return Readings(list(self.read_iter(sources, names, keep_images)), self.threshold)


def _name(src: ImageInput, k: int) -> str:
    return Path(src).name if isinstance(src, (str, Path)) else f"image {k}"


def read_number_line(model: NumberReader, image: torch.Tensor, dets: Detections) -> Detections:
    """``dets`` with ``model``'s reading of the line the digits sit on (``line``) and its proposer's
    number there (``proposal``; :func:`digit_demo.number_reader.read_region`) and its tuned margin
    (``line_margin``), around the number the detections read at the reader's ``region_threshold``
    (else at the lowest of LINE_THRESHOLDS); unchanged where no
    digit is found or the digits stand in a column (the reader reads rows)."""
    number = assemble(dets, model.region_threshold, judge=False)
    if not number.text:
        number = assemble(dets, min(LINE_THRESHOLDS), judge=False)
    if not number.text or is_column(number.digits.boxes):
        return dets
    line, proposal = read_region(model, image, torch.from_numpy(number.digits.boxes).float(), number.text)
    return replace(dets, line=line, line_margin=model.line_margin, proposal=proposal)
