"""The reading pipeline: the one place that knows the order of the stages.

``Pipeline(PipelineConfig(...)).read(images)`` runs, per image: load (:mod:`digit_demo.images`),
locate the house numbers (by default PP-OCR's text lines, :mod:`digit_demo.ocr`, after the readers
have read the photo whole and were not sure of a number that fills it; or the CNN locator,
:mod:`digit_demo.locator`), then, on each located region's crop at full resolution or on the whole
photo, detect with each member (:class:`digit_demo.detect.Detector`, which also re-reads every spot
with the digit reader), fuse the members (:mod:`digit_demo.ensemble`), read the whole number's line
(:mod:`digit_demo.number_reader`), and keeps the raw detections; ``readings.at(threshold)`` then
judges and assembles the numbers (:mod:`digit_demo.judge`) at any threshold without running a
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

from .assemble import THRESHOLDS, assemble
from .calibration import threshold_for
from .checkpoints import DEFAULT_MODEL
from .detect import Detector, set_threads, to_tensor
from .ensemble import DEFAULT_FUSION, FUSIONS, ensemble_key, fuse, member_threshold, member_weights
from .images import ImageError, ImageInput, decode, load_image
from .inference import has_amx, inference_precision
from .locator import DEFAULT_LOCATOR, INPUT_SIDE, MIN_PHOTO_SIDE, Locator, input_size, locate, optional_locator, reading_box
from .number_reader import (DEFAULT_NUMBER_READER, DEFAULT_PROPOSER, NumberReader, optional_number_reader,
                            read_region)
from .reader import DEFAULT_READER, DigitReader, optional_reader
from .judge import read
from .reading import Reading, Readings, RegionReading
from .ocr import PPOCR, TextFinder, TextLine, TextSettings, number_lines
from .ocr import available as ppocr_available
from .types import Detections, Found, LeadReading, LineReading, TextReading

__all__ = ["ModelCache", "Pipeline", "PipelineConfig", "Reading", "Readings", "RegionReading", "Stages"]


def default_locator() -> str:
    """What finds the numbers by default: PP-OCR's text lines (real_dev, 118 real photos: 0.949 of the
    numbers read, against 0.525 with the CNN locator; SVHN `valid` 0.873 against 0.857), where its
    packages are installed; else the CNN locator."""
    return PPOCR if ppocr_available() else DEFAULT_LOCATOR


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
    locator: str | None = field(default_factory=default_locator)

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

    def locator(self, name: str | None, precision: str) -> "Locator | TextFinder | None":
        if name == PPOCR:
            return self._get(("locator", name), TextFinder)
        return self._get(("locator", name, precision), lambda: optional_locator(name, precision))


DEFAULT_CACHE = ModelCache()


@dataclass
class Stages:
    """The built stages a pipeline runs: its detector ``members`` (each with ``name``, ``meta`` and
    ``detect_tensors``, as :class:`digit_demo.detect.Detector`), and the optional second stages.
    :meth:`load` builds those a configuration names; tests and tools may hand in their own."""

    members: list
    digit_reader: DigitReader | None = None
    number_reader: NumberReader | None = None
    locator: "Locator | TextFinder | None" = None
    fallback: Locator | None = None  # where PP-OCR finds no digit line: the CNN locator, if shipped

    @classmethod
    def load(cls, config: PipelineConfig, cache: ModelCache | None = None) -> "Stages":
        cache = cache or DEFAULT_CACHE
        reader = cache.digit_reader(config.digit_reader, config.precision)
        members = [Detector(*cache.detector(m, config.precision), batch_size=config.batch_size, reader=reader,
                            multi_scale=config.multi_scale) for m in config.models]
        fallback = cache.locator(DEFAULT_LOCATOR, config.precision) if config.locator == PPOCR else None
        return cls(members, reader, cache.number_reader(config.number_reader, config.proposer, config.precision),
                   cache.locator(config.locator, config.precision), fallback)


class Pipeline:
    """Images in, house numbers out, for one :class:`PipelineConfig`.

    >>> pipe = Pipeline()                       # the shipped default, offline, on the CPU
    >>> readings = pipe.read(["house.jpg"])
    >>> readings.at()[0].text                   # at the calibrated threshold; .at(0.6) at another

    ``stages`` hands in built stages instead of loading the configured checkpoints. ``memo`` (a dict,
    shared between pipelines) keeps each member's detections of each image region, keyed by the
    member read alone, so pipelines that share members (an ensemble and its members, measured side by
    side) run each member once per image.
    """

    def __init__(self, config: PipelineConfig | None = None, cache: ModelCache | None = None,
                 stages: Stages | None = None, memo: dict | None = None):
        self.config = config = config or PipelineConfig()
        set_threads()  # $DIGIT_DEMO_THREADS, where set, for every entry point
        self.stages = stages = stages or Stages.load(config, cache)
        self.members, self.digit_reader = stages.members, stages.digit_reader
        self.number_reader, self.locator = stages.number_reader, stages.locator
        self.memo = memo
        self.weights = member_weights([m.meta for m in self.members])
        self.member_thresholds = [member_threshold(m.meta, config.multi_scale) for m in self.members]
        self.threshold = config.threshold if config.threshold is not None else threshold_for(config)

    @property
    def name(self) -> str:
        return self.config.key

    def detect_tensors(self, tensors: Sequence[torch.Tensor], keys: Sequence | None = None) -> list[Found]:
        """What the models find in each image (float CHW tensors in [0, 1]): its digit detections, with
        the number reader's reading of their line; an ensemble's fused, with its lead member's own
        reading (:meth:`combine`). ``keys`` name the images for the ``memo``."""
        per_member = [self._member(m, tensors, keys) for m in self.members]
        if len(self.members) == 1:
            return per_member[0]
        return self.combine(tensors, per_member)

    def _member(self, member, tensors: Sequence[torch.Tensor], keys: Sequence | None) -> list[Found]:
        """What ``member`` finds in ``tensors``, lines read, from the memo where it has them."""
        if self.memo is None or keys is None:
            return self.with_lines(tensors, [Found(d) for d in member.detect_tensors(tensors)])
        alone = self.config.key_for([member.name])
        todo = [k for k, key in enumerate(keys) if (alone, key) not in self.memo]
        if todo:
            found = self.with_lines([tensors[k] for k in todo],
                                    [Found(d) for d in member.detect_tensors([tensors[k] for k in todo])])
            self.memo.update({(alone, keys[k]): d for k, d in zip(todo, found)})
        return [self.memo[alone, key] for key in keys]

    def with_lines(self, tensors: Sequence[torch.Tensor], found: Sequence[Found]) -> list[Found]:
        """``found`` with the number reader's reading of each image's line (unchanged without a number
        reader, or where a line has been read already)."""
        if self.number_reader is None:
            return list(found)
        return [f if f.line is not None else replace(f, line=read_number_line(self.number_reader, t, f.detections))
                for t, f in zip(tensors, found)]

    def combine(self, tensors: Sequence[torch.Tensor], per_member: Sequence[Sequence[Found]]) -> list[Found]:
        """Fuse what the members found in ``tensors`` (``per_member[m][i]`` for image ``i``, their lines
        read) by the configured fusion, with the number reader's reading of the fused digits' line and
        the lead member's own reading (the largest weight: the most accurate; at its own threshold) and
        the numbers the other members read alone (``Found.lead``, weighed by :func:`digit_demo.judge.by_lead`)."""
        c = self.config
        fused = self.with_lines(tensors, [Found(fuse([f.detections for f in d], c.fusion, c.fusion_iou, self.weights,
                                                     self.member_thresholds)) for d in zip(*per_member)])
        alone = [[read(f, 0.5 if t is None else t) for f in found] for found, t in zip(per_member, self.member_thresholds)]
        lead = int(np.argmax(self.weights))
        rest = [a for m, a in enumerate(alone) if m != lead]
        return [replace(f, lead=LeadReading(alone[lead][i], tuple(r[i].text for r in rest))) for i, f in enumerate(fused)]

    def _detect_each(self, names: list[str], tensors: list[torch.Tensor], keys: list) -> list[tuple[Found | None, str | None]]:
        """Detections for a batch; where the batch fails, image by image, so one image's failure is
        its own error line and not the batch's."""
        try:
            return [(d, None) for d in self.detect_tensors(tensors, keys)]
        except Exception:
            if len(tensors) == 1:
                raise
        out: list[tuple[Found | None, str | None]] = []
        for name, t, key in zip(names, tensors, keys):
            try:
                out.append((self.detect_tensors([t], [key])[0], None))
            except Exception as e:  # any failure on one image: say which, and read the others
                out.append((None, f"{name}: could not be read ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"))
        return out

    def locate(self, src: ImageInput, name: str) -> tuple[Image.Image, list[RegionReading]]:
        """The full-resolution image and the regions to read in it: the house numbers located in it,
        else one region covering the image (no locator, or nothing located). PP-OCR's lines that hold
        digits are regions in any image (:meth:`text_located`), but a photo the readers read whole first
        (:meth:`reads_first`) is one region covering it until :meth:`read_iter` finds it not
        :meth:`settled`. The CNN locator reads a JPEG decoded at a reduced scale, and only photos whose
        short side reaches MIN_PHOTO_SIDE."""
        if self.locator is None:
            full = load_image(src, name)
            return full, [RegionReading.covering(*full.size)]
        if isinstance(self.locator, TextFinder):
            full = load_image(src, name)
            return full, [RegionReading.covering(*full.size)] if self.reads_first(full) else self.text_located(full)
        seen = decode(src, name, draft_side=INPUT_SIDE)
        full = seen.image if not seen.reduced else load_image(src, name)
        return full, located(self.locator, seen.image, full.size)

    def text_located(self, full: Image.Image) -> list[RegionReading]:
        """The regions PP-OCR's digit lines give in ``full``, each with what PP-OCR read there
        (:func:`text_regions`). Where it finds none it is ``TextSettings.join_below`` sure of, or cannot
        take the image (too thin to scale to its input, say), the CNN locator's regions
        (``Stages.fallback``) that overlap none of its lines join them; else the image whole."""
        try:
            lines = number_lines(self.locator.lines(full))
        except Exception:  # rapidocr raises on shapes it cannot resize; the readers still read the image
            lines = []
        settings = self.locator.settings
        regions = text_regions(lines, full.size, settings)
        read_whole = bool(lines) and regions[0].whole  # a crop its number fills
        unsure = not lines or (settings.join_below is not None and max(t.score for t in lines) < settings.join_below)
        if self.stages.fallback is None or read_whole or not unsure:
            return regions
        kept = [r for r in regions if not r.whole]
        found = [r for r in located(self.stages.fallback, full, full.size) if not r.whole]
        joined = kept + [r for r in found if not any(_overlapping(r.box, k.box) for k in kept)]
        return joined or [RegionReading.covering(*full.size)]

    def reads_first(self, image: Image.Image) -> bool:
        """Whether the readers read ``image`` whole before PP-OCR looks: PP-OCR locates, with a
        ``TextSettings.settle`` bar, and the image's short side is at most ``settle_side``."""
        if not isinstance(self.locator, TextFinder) or self.locator.settings.settle is None:
            return False
        return self.locator.settings.crop_sized(image.size)

    def settled(self, reading: Reading) -> bool:
        """Whether the readers' reading of the whole photo stands without PP-OCR: a number at least
        ``TextSettings.settle`` sure at the pipeline's threshold, whose tallest digit is at least
        ``settle_share`` of the photo's height (the number fills the photo, as in an SVHN crop)."""
        settings = self.locator.settings
        number = reading.regions[0].number(self.threshold)
        if not number.text or number.confidence < settings.settle:
            return False
        boxes = number.digits.boxes
        return float((boxes[:, 3] - boxes[:, 1]).max()) >= settings.settle_share * reading.image.size[1]

    def read_iter(self, sources: Iterable[ImageInput], names: Iterable[str] | None = None,
                  keep_images: bool = False) -> Iterator[Reading]:
        """Read ``sources`` (paths, bytes, PIL images or arrays) in batches of the configured size,
        yielding one :class:`Reading` per source, in order; an image that cannot be loaded or read
        gets a reading with an ``error`` naming it, and the rest are read.

        With PP-OCR as the locator and a ``settle`` bar, the readers read each photo up to
        ``settle_side`` px on its short side whole first, and PP-OCR locates only in those whose reading is not
        :meth:`settled` (and in every larger photo); where it too reads the photo whole, the first
        reading is kept (no model runs twice on one region)."""
        sources = list(sources)
        names = list(names) if names is not None else [_name(s, k) for k, s in enumerate(sources, 1)]
        step = self.config.batch_size
        for i in range(0, len(sources), step):
            batch: list[Reading] = []
            for src, name in zip(sources[i : i + step], names[i : i + step]):
                reading = Reading(name)
                batch.append(reading)
                try:
                    reading.image, reading.regions = self.locate(src, name)
                except ImageError as e:
                    reading.error = str(e)
            first = [r for r in batch if not r.error and self.reads_first(r.image)]
            self._read_regions(batch)
            for reading in first:
                if reading.error or self.settled(reading):
                    continue
                whole = reading.regions[0].raw
                reading.regions = self.text_located(reading.image)
                for region in reading.regions:
                    if region.whole:
                        region.raw = whole if region.text is None else replace(whole, text=region.text)
            self._read_regions(batch)
            for reading in batch:
                if not keep_images or reading.error:
                    reading.image = None
            yield from batch

    def _read_regions(self, batch: list[Reading]) -> None:
        """Run the models on every region of ``batch`` not read yet (``raw`` None), as one batch; an
        image whose region fails gets the error and no regions."""
        jobs = [(reading, region, to_tensor(reading.image if region.whole else reading.image.crop(region.crop)))
                for reading in batch if not reading.error for region in reading.regions if region.raw is None]
        if not jobs:
            return
        found = self._detect_each([r.name for r, _, _ in jobs], [t for _, _, t in jobs],
                                  [_region_key(r, g) for r, g, _ in jobs])
        for (reading, region, _), (raw, error) in zip(jobs, found):
            if error:
                reading.error, reading.regions = error, []
            elif not reading.error:
                region.raw = raw if region.text is None else replace(raw, text=region.text)

    def read(self, sources: Iterable[ImageInput], names: Iterable[str] | None = None,
             keep_images: bool = True) -> Readings:
        """Read every image (:meth:`read_iter`); the readings keep the decoded images by default."""
        return Readings(list(self.read_iter(sources, names, keep_images)), self.threshold)


def located(locator: Locator, image: Image.Image, size: tuple[int, int]) -> list[RegionReading]:
    """The regions the CNN ``locator`` finds in ``image`` (the photo, perhaps decoded at a reduced scale)
    of a photo of ``size`` (width, height, full resolution), each to be read from a padded crop; one
    region covering the photo where it finds none, or where the photo's short side is under
    MIN_PHOTO_SIDE (a crop)."""
    regions = []
    if min(size) >= MIN_PHOTO_SIDE:
        small = image.resize(input_size(*size), Image.BILINEAR)
        regions = [RegionReading(r.box, r.score, reading_box(r.box, *size, locator.settings.pad),
                                 rank_power=locator.settings.rank_power)
                   for r in locate(locator, to_tensor(small), size)]
    return regions or [RegionReading.covering(*size)]


def text_regions(lines: list[TextLine], size: tuple[int, int], settings: TextSettings) -> list[RegionReading]:
    """The regions to read for PP-OCR's digit ``lines`` in a photo of ``size`` (width, height): in a
    photo up to ``settle_side`` on its short side (an SVHN-like crop) whose first line is at least
    ``crop_share`` of its height (the number fills it), the photo whole, else each line's padded crop;
    each with what PP-OCR read there (to overrule the readers it must be ``min_score_whole`` sure in a
    photo read whole, else ``min_score``; where they misread the line's layout, ``min_score``); the photo
    whole where none holds digits."""
    width, height = size
    if not lines:
        return [RegionReading.covering(width, height)]
    first = lines[0]
    if settings.crop_sized(size) and first.box[3] - first.box[1] >= settings.crop_share * height:
        whole = RegionReading.covering(width, height)
        whole.text = TextReading(first.digits, first.score, first.box, settings.min_score_whole, first.text,
                                 settings.min_score)
        return [whole]
    regions = []
    for line in lines:
        box = np.array(line.box, np.float32)
        crop = reading_box(box, width, height, settings.pad)
        inside = (line.box[0] - crop[0], line.box[1] - crop[1], line.box[2] - crop[0], line.box[3] - crop[1])
        regions.append(RegionReading(box, line.score, crop, text=TextReading(line.digits, line.score, inside, settings.min_score, line.text, settings.min_score)))
    return regions


def _overlapping(a: np.ndarray, b: np.ndarray, share: float = 0.3) -> bool:
    """Whether xyxy boxes ``a`` and ``b`` share at least ``share`` of the smaller one's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w > 0 and h > 0 and w * h >= share * smaller


def _region_key(reading: Reading, region: RegionReading) -> tuple:
    """How a ``memo`` names one image region: the image's name and the region's crop."""
    return reading.name, region.crop


def memo_of(member_key: str, readings: Iterable[Reading]) -> dict:
    """A ``memo`` (:class:`Pipeline`) holding what the member read alone as ``member_key`` found in
    each region of ``readings``: an ensemble with that member, reading the same images, runs it no more."""
    return {(member_key, _region_key(r, g)): g.raw for r in readings for g in r.regions if g.raw is not None}


def _name(src: ImageInput, k: int) -> str:
    return Path(src).name if isinstance(src, (str, Path)) else f"image {k}"


def read_number_line(model: NumberReader, image: torch.Tensor, dets: Detections) -> LineReading | None:
    """``model``'s reading of the line the digits sit on, and its proposer's number there
    (:func:`digit_demo.number_reader.read_region`), around the number the detections read at the
    reader's ``region_threshold`` (else at the lowest of THRESHOLDS); None where no digit is found. A
    vertical stack is read top to bottom, its digits laid side by side."""
    number = assemble(dets, model.settings.region_threshold)
    if not number.text:
        number = assemble(dets, min(THRESHOLDS))
    if not number.text:
        return None
    line, proposal = read_region(model, image, torch.from_numpy(number.digits.boxes).float(), number.text)
    return LineReading(line, model.settings.line_margin, proposal)
