"""Running detectors on images: one model or an ensemble, raw detections out."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from .assemble import Detections, assemble
from .checkpoints import DEFAULT_MODEL, load_checkpoint
from .ensemble import DEFAULT_FUSION, ensemble_key, fuse, member_threshold, member_weights, nms_fusion
from .images import ImageInput, load_image
from .models import for_inference, multi_scale_views
from .reader import DEFAULT_READER, DigitReader, optional_reader, refine
from .sequence import DEFAULT_PROPOSER, DEFAULT_SEQUENCE, NumberReader, optional_number_reader, read_line


def set_threads(threads: int | None) -> None:
    """Bound torch's intra-op threads (None leaves the default)."""
    if threads:
        torch.set_num_threads(threads)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return pil_to_tensor(img).float().div_(255)


def outputs_to_detections(outputs: list[dict]) -> list[Detections]:
    """torchvision detection outputs (labels = digit + 1) to :class:`Detections`."""
    return [
        Detections(
            o["boxes"].detach().cpu().float().numpy(),
            o["scores"].detach().cpu().float().numpy(),
            (o["labels"].detach().cpu() - 1).numpy().astype(np.int64),
        )
        for o in outputs
    ]


class Detector:
    """A loaded checkpoint: ``detector(images)`` returns raw detections (score >= the model's floor),
    re-read by the second-stage ``reader`` when one is given (:func:`digit_demo.reader.refine`).

    With ``multi_scale`` each image is also read at a larger input size
    (:func:`digit_demo.models.multi_scale_views`) and the two readings are merged by class-aware NMS:
    digits one size misses the other may find, for about twice the time. With a ``number_reader``
    the detections also carry its reading of the whole line (:func:`digit_demo.sequence.read_line`).
    """

    def __init__(self, model: nn.Module, meta: dict, batch_size: int = 8, reader: DigitReader | None = None,
                 multi_scale: bool = False, number_reader: NumberReader | None = None):
        self.model = model.eval()
        self.meta = meta
        self.name = meta.get("name", "model")
        self.batch_size = batch_size
        self.reader = reader
        self.multi_scale = multi_scale
        self.number_reader = number_reader
        self.views = multi_scale_views(self.model) if multi_scale else [self.model]

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_MODEL, reader: str | Path | None = DEFAULT_READER,
             number_reader: str | Path | None = DEFAULT_SEQUENCE, precision: str | None = None, **kwargs) -> "Detector":
        """Load a detector checkpoint and (unless None) the digit reader and the number reader, ready for
        inference in ``precision`` (:func:`digit_demo.models.for_inference`)."""
        model, meta = load_checkpoint(name_or_path)
        return cls(for_inference(model, precision), meta, reader=optional_reader(reader, precision),
                   number_reader=optional_number_reader(number_reader, precision=precision), **kwargs)

    def _read(self, view: nn.Module, tensors: Sequence[torch.Tensor]) -> list[Detections]:
        out: list[Detections] = []
        for i in range(0, len(tensors), self.batch_size):
            out += outputs_to_detections(view(list(tensors[i : i + self.batch_size])))
        if self.reader is not None:
            out = [refine(self.reader, t, d) for t, d in zip(tensors, out)]
        return out

    @torch.inference_mode()
    def spot_tensors(self, tensors: Sequence[torch.Tensor]) -> list[Detections]:
        """The digits found, without the number reader's reading."""
        readings = [self._read(view, tensors) for view in self.views]
        return readings[0] if len(readings) == 1 else [nms_fusion(list(d)) for d in zip(*readings)]

    def detect_tensors(self, tensors: Sequence[torch.Tensor]) -> list[Detections]:
        return with_lines(self.number_reader, tensors, self.spot_tensors(tensors))

    def __call__(self, images: Iterable[ImageInput]) -> list[Detections]:
        return self.detect_tensors([to_tensor(load_image(im)) for im in images])


class Ensemble:
    """Several detectors whose detections are fused per image: ``vote`` (class-agnostic clusters,
    weighted digit vote on calibrated scores), ``wbf`` (weighted box fusion) or ``nms`` (the
    reference's class-aware NMS). Members weigh by their validation accuracy."""

    def __init__(self, members: Sequence[Detector], method: str = DEFAULT_FUSION, iou: float = 0.55):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.method = method
        self.iou = iou
        self.weights = member_weights([m.meta for m in members])
        self.thresholds = [member_threshold(m.meta, m.multi_scale) for m in members]
        self.name = ensemble_key([m.name for m in members], method, members[0].reader is not None,
                                 members[0].multi_scale)
        self.number_reader = members[0].number_reader  # reads the fused digits' line once

    def combine(self, tensors: Sequence[torch.Tensor], per_member: Sequence[Sequence[Detections]]) -> list[Detections]:
        """Fuse members' detections of ``tensors``, given as ``per_member[m][i]`` for image ``i``
        (:func:`fuse_members`)."""
        return fuse_members(tensors, per_member, self.method, self.iou, self.weights, self.thresholds,
                            self.number_reader)

    def detect_tensors(self, tensors: Sequence[torch.Tensor]) -> list[Detections]:
        return self.combine(tensors, [m.spot_tensors(tensors) for m in self.members])

    def __call__(self, images: Iterable[ImageInput]) -> list[Detections]:
        return self.detect_tensors([to_tensor(load_image(im)) for im in images])


def with_lines(number_reader: NumberReader | None, tensors: Sequence[torch.Tensor],
               found: list[Detections]) -> list[Detections]:
    """Each image's detections with ``number_reader``'s reading of their line (unchanged without one,
    or where a line has been read already)."""
    if number_reader is None:
        return found
    return [read_line(number_reader, t, d) if d.line is None else d for t, d in zip(tensors, found)]


def fuse_members(tensors: Sequence[torch.Tensor], per_member: Sequence[Sequence[Detections]], method: str,
                 iou: float, weights: list[float], thresholds: list[float | None],
                 number_reader: NumberReader | None) -> list[Detections]:
    """Each image's fused detections (``per_member[m][i]`` for image ``i`` of ``tensors``, fused by
    ``method``), with ``number_reader``'s reading of the fused digits' line, the number the lead
    member (the largest weight: the most accurate on valid) reads alone at its own threshold
    (``Detections.lead``) and the numbers the other members read alone (``Detections.others``);
    :func:`digit_demo.assemble.assemble` weighs them. Members' lines are read here unless their
    detections carry them already (as :meth:`Detector.detect_tensors` gives them)."""
    fused = with_lines(number_reader, tensors, [fuse(list(d), method, iou, weights, thresholds)
                                                for d in zip(*per_member)])
    alone = [[assemble(d, **({} if t is None else {"threshold": t}))
              for d in with_lines(number_reader, tensors, list(found))] for found, t in zip(per_member, thresholds)]
    lead = int(np.argmax(weights))
    rest = [a for m, a in enumerate(alone) if m != lead]
    return [replace(f, lead=alone[lead][i], others=tuple(r[i].text for r in rest)) for i, f in enumerate(fused)]


def load_detector(names: Sequence[str | Path], fusion: str = DEFAULT_FUSION, iou: float = 0.55, batch_size: int = 8,
                  reader: str | Path | None = DEFAULT_READER, multi_scale: bool = False,
                  number_reader: str | Path | None = DEFAULT_SEQUENCE,
                  proposer: str | Path | None = DEFAULT_PROPOSER, precision: str | None = None) -> Detector | Ensemble:
    """One name gives a :class:`Detector`; several give an :class:`Ensemble` fused by ``fusion``
    (members share one digit ``reader`` and ``number_reader`` with its ``proposer``; ``multi_scale``
    applies to each); all ready for inference in ``precision``, as :meth:`Detector.load`."""
    shared = optional_reader(reader, precision)
    lines = optional_number_reader(number_reader, proposer, precision)
    detectors = [Detector.load(n, reader=None, number_reader=None, precision=precision) for n in names]
    detectors = [Detector(d.model, d.meta, batch_size=batch_size, reader=shared, multi_scale=multi_scale,
                          number_reader=lines) for d in detectors]
    return detectors[0] if len(detectors) == 1 else Ensemble(detectors, fusion, iou)


def detect_paths(detector: Detector | Ensemble, paths: Sequence[Path], batch_size: int = 8, progress: bool = False
                 ) -> tuple[dict[Path, Detections], dict[Path, str]]:
    """Detect digits in image files, in batches; unreadable files are reported, not raised."""
    from tqdm import tqdm

    from .images import ImageError

    results: dict[Path, Detections] = {}
    errors: dict[Path, str] = {}
    bar = tqdm(total=len(paths), unit="img", disable=not progress)
    for i in range(0, len(paths), batch_size):
        chunk, tensors = [], []
        for p in paths[i : i + batch_size]:
            try:
                tensors.append(to_tensor(load_image(p)))
                chunk.append(p)
            except ImageError as e:
                errors[p] = str(e)
        if tensors:
            results.update(zip(chunk, detector.detect_tensors(tensors)))
        bar.update(len(paths[i : i + batch_size]))
    bar.close()
    return results, errors
