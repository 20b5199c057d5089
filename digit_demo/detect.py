"""The detect stage: one Faster R-CNN checkpoint finds digits in images, and the digit reader
(:mod:`digit_demo.reader`) re-reads each spot it found."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from .checkpoints import DEFAULT_MODEL, load_checkpoint
from .ensemble import nms_fusion
from .images import ImageInput, load_image
from .inference import for_inference
from .models import multi_scale_views
from .reader import DigitReader, refine
from .types import Detections

# Photos whose long side exceeds this many times their short side are read in overlapping tiles, each
# of the detector's own input aspect (long-side cap / short side, about 2.8), so each is read at the
# scale the detector reads a photo (:func:`tiles`); where that would take more than MAX_TILES, the photo
# is letterboxed instead (:func:`letterbox`). SVHN's photos stay under 5.2 (train) and 4.9 (valid), so
# none is touched; a 20000 x 8 strip would otherwise shrink to under one pixel in the detector's resize
# and stop it.
MAX_ASPECT = 8.0
MAX_TILES = 32
TILE_OVERLAP = 0.25


THREADS_ENV = "DIGIT_DEMO_THREADS"


_chosen: list[int] = []  # a count given explicitly (e.g. --threads), which the environment does not override


def env_count(name: str, default: int | None = None) -> int | None:
    """``$name`` as a positive whole number (digits only), else ``default`` where it is unset or empty.
    Anything else raises ValueError with one line naming the variable and its value."""
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r} is not a positive whole number")
    return int(value)


def set_threads(threads: int | None = None) -> None:
    """Bound torch's intra-op threads to ``threads``; None: to ``$DIGIT_DEMO_THREADS`` where it is set
    and no count was given explicitly before (else torch's default stands). A count that is not a
    positive whole number raises ValueError."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} is not a positive whole number")
    if threads:
        _chosen[:] = [threads]
    n = threads or (None if _chosen else env_count(THREADS_ENV))
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as a float CHW tensor in [0, 1]."""
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


def tiles(length: int, side: int, aspect: float, overlap: float = TILE_OVERLAP) -> list[int]:
    """Start offsets along a strip's long side (``length`` px; its short side ``side`` px) of windows
    ``aspect`` x ``side`` long, overlapping by ``overlap`` of a window, the last ending at the end."""
    window = max(1, int(aspect * side))
    if length <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, length - window, step))
    return starts + [length - window]


def letterbox(image: torch.Tensor, long_side: int, max_aspect: float = MAX_ASPECT) -> tuple[torch.Tensor, float]:
    """A float CHW ``image`` as the detector should see it, and the scale from its pixels to the
    image's: unchanged (scale 1) unless its aspect ratio exceeds ``max_aspect``; then resized so its
    long side is ``long_side`` and padded with zeros (right or bottom) to ``max_aspect``, so boxes
    found on it map back by dividing by the scale."""
    h, w = image.shape[-2:]
    if max(h, w) <= max_aspect * min(h, w):
        return image, 1.0
    scale = long_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    short = int(np.ceil(long_side / max_aspect))
    pad = (0, max(0, short - size[1]), 0, max(0, short - size[0]))  # (left, right, top, bottom)
    return F.pad(small, pad), scale


class Detector:
    """One loaded detector checkpoint: ``detector.detect_tensors(tensors)`` returns each image's raw
    detections (score >= the model's floor, boxes xyxy in the image's pixels), re-read by the digit
    ``reader`` when one is given (:func:`digit_demo.reader.refine`).

    With ``multi_scale`` each image is also read at a larger input size
    (:func:`digit_demo.models.multi_scale_views`) and the two readings are merged by class-aware NMS:
    digits one size misses the other may find, for about twice the time. Photos of extreme aspect
    ratio are read in tiles (:func:`tiles`), or letterboxed (:func:`letterbox`) where that would take
    more than MAX_TILES. :class:`digit_demo.pipeline.Pipeline` runs the
    stages after this one."""

    def __init__(self, model: nn.Module, meta: dict, batch_size: int = 8, reader: DigitReader | None = None,
                 multi_scale: bool = False):
        self.model = model.eval()
        self.meta = meta
        self.name = meta.get("name", "model")
        self.batch_size = batch_size
        self.reader = reader
        self.multi_scale = multi_scale
        self.views = multi_scale_views(self.model) if multi_scale else [self.model]
        cfg = self.model.digit_config
        self.long_side = int(cfg.test_max_size or cfg.max_size)
        self.tile_aspect = self.long_side / (cfg.test_size or cfg.train_size)

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_MODEL, reader: DigitReader | None = None,
             precision: str | None = None, **kwargs) -> "Detector":
        """Load a detector checkpoint ready for inference in ``precision``
        (:func:`digit_demo.inference.for_inference`), with the digit ``reader`` given (or none)."""
        model, meta = load_checkpoint(name_or_path)
        return cls(for_inference(model, precision), meta, reader=reader, **kwargs)

    def _input_shape(self, view: nn.Module, image: torch.Tensor) -> tuple[int, int]:
        """The padded size ``view``'s transform gives ``image`` (torchvision's resize, then the batch's
        ``size_divisible`` padding)."""
        tr = view.transform
        lo, hi = (tr.test_size, tr.test_max_size or tr.max_size) if getattr(tr, "test_size", None) else (tr.min_size[-1], tr.max_size)
        h, w = image.shape[-2:]
        scale = min(lo / min(h, w), hi / max(h, w))
        d = tr.size_divisible
        return math.ceil(math.floor(h * scale) / d) * d, math.ceil(math.floor(w * scale) / d) * d

    def _forward(self, view: nn.Module, images: list[torch.Tensor]) -> list[Detections]:
        """``view`` on each image (on the model's device), batched only with images it pads to the same
        size, so an image reads exactly as it does alone (torchvision pads a batch to its largest image,
        which moves proposals)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            groups.setdefault(self._input_shape(view, image), []).append(k)
        out: list[Detections | None] = [None] * len(images)
        device = next(self.model.parameters()).device  # a model training on a GPU reads there
        for members in groups.values():
            for i in range(0, len(members), self.batch_size):
                chunk = members[i : i + self.batch_size]
                for k, d in zip(chunk, outputs_to_detections(view([images[k].to(device) for k in chunk]))):
                    out[k] = d
        return out

    def _read(self, view: nn.Module, tensors: Sequence[torch.Tensor]) -> list[Detections]:
        """Each image's detections by ``view``; strips read in tiles (:func:`tiles`) or letterboxed."""
        inputs: list[torch.Tensor] = []
        plan: list[list[tuple[int, int, float]]] = []  # per image: (input index, offset along it, scale)
        for t in tensors:
            h, w = t.shape[-2:]
            starts = tiles(max(h, w), min(h, w), self.tile_aspect)
            if max(h, w) <= MAX_ASPECT * min(h, w) or len(starts) > MAX_TILES:
                image, scale = letterbox(t, self.long_side)
                plan.append([(len(inputs), 0, scale)])
                inputs.append(image)
                continue
            window = max(1, int(self.tile_aspect * min(h, w)))
            plan.append([])
            for start in starts:
                plan[-1].append((len(inputs), start, 1.0))
                inputs.append(t[:, :, start : start + window] if w > h else t[:, start : start + window, :])
        found = self._forward(view, inputs)
        out: list[Detections] = []
        for t, parts in zip(tensors, plan):
            h, w = t.shape[-2:]
            pieces = []
            for index, start, scale in parts:
                d = found[index]
                shift = np.array([start, 0, start, 0] if w > h else [0, start, 0, start], np.float32)
                boxes = np.clip(d.boxes / scale + shift, 0, [w, h, w, h]).astype(np.float32)
                pieces.append(Detections(boxes, d.scores, d.digits))
            out.append(pieces[0] if len(pieces) == 1 else nms_fusion(pieces, iou=0.5))
        if self.reader is not None:
            out = [refine(self.reader, t, d) for t, d in zip(tensors, out)]
        return out

    @torch.inference_mode()
    def detect_tensors(self, tensors: Sequence[torch.Tensor]) -> list[Detections]:
        """The digits found in each of ``tensors`` (float CHW in [0, 1])."""
        readings = [self._read(view, tensors) for view in self.views]
        return readings[0] if len(readings) == 1 else [nms_fusion(list(d)) for d in zip(*readings)]

    def __call__(self, images: Iterable[ImageInput]) -> list[Detections]:
        return self.detect_tensors([to_tensor(load_image(im)) for im in images])
