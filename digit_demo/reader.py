"""Second stage: a small CNN that re-reads every detected digit from a crop of the original photo.

The detectors see a photo at ~120 px; a digit then spans a few cells of their feature maps, and the
box classifier confuses similar digits. The reader looks at each candidate spot again at its own
resolution (a square crop around the box, 32 x 32) and says which digit it is, or that there is
none (class 10, background). :func:`refine` merges its answer with the detector's scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou, nms, roi_align

from .types import Detections
from .checkpoints import load_module, resolve_optional, tuned, write_weights
from .inference import for_inference

CROP = 32
CONTEXT = 1.2  # crop side = CONTEXT x the box's longer side
BACKGROUND = 10
READER_CLASSES = 11  # digits 0-9 + background
READER_ARCHITECTURE = "digit_reader_cnn"
DEFAULT_READER = "digit_reader"
BOX_BLEND = 0.5  # refined box = (1 - b) x the detector's + b x the reader's (readers with a box head)


def square_boxes(boxes: torch.Tensor, context: float = CONTEXT) -> torch.Tensor:
    """Squares centred on xyxy ``boxes``, ``context`` x their longer side."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = context * (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True).clamp(min=1) / 2
    return torch.cat([c - half, c + half], 1)


def crop_digits(image: torch.Tensor, boxes: torch.Tensor, size: int = CROP, context: float = CONTEXT) -> torch.Tensor:
    """Square ``size`` x ``size`` crops of a float CHW ``image`` around xyxy ``boxes`` (zeros outside
    the photo; averaged, not aliased, when the box is larger than the crop)."""
    if not len(boxes):
        return image.new_zeros((0, image.shape[0], size, size))
    return roi_align(image[None], [square_boxes(boxes.float(), context)], size, 1.0, sampling_ratio=0, aligned=True)


def _block(cin: int, cout: int, stride: int | tuple[int, int]) -> nn.Sequential:
    """Two 3 x 3 conv + batch norm + ReLU layers, the first with ``stride``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


def trunk(width: int, last_stride: int | tuple[int, int] = 2) -> list[nn.Sequential]:
    """The reader's four conv blocks (``width`` to 8 x ``width`` channels); the whole-number reader's
    "reader" backbone reuses them with the last block striding only down (``last_stride`` (2, 1))."""
    return [_block(3, width, 1), _block(width, 2 * width, 2), _block(2 * width, 4 * width, 2),
            _block(4 * width, 8 * width, last_stride)]


@dataclass(frozen=True)
class RefineSettings:
    """How :func:`refine` uses a digit reader: ``box_blend``, how far a box moves to where the reader's
    box head sees the digit (tuned with the reader), and ``verify``, how far the reader's background
    class overrules the detector's presence (0 for readers trained without the detector's false boxes)."""

    box_blend: float = BOX_BLEND
    verify: float = 0.0


class DigitReader(nn.Module):
    """A VGG-style CNN on 32 x 32 crops; each crop is standardised to zero mean and unit variance,
    so dark-on-light and light-on-dark plates differ only in sign. With ``box_head`` it also says
    where the digit sits in the crop (x1, y1, x2, y2 as fractions of the crop's side)."""

    def __init__(self, width: int = 32, classes: int = READER_CLASSES, box_head: bool = False,
                 settings: "RefineSettings | None" = None):
        super().__init__()
        self.width = width
        self.settings = settings or RefineSettings()  # how :func:`refine` uses this reader
        blocks = trunk(width)
        self.net = nn.Sequential(
            *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * width, classes),
        )
        self.bfloat16_parts = tuple(f"net.{i}" for i in range(len(blocks)))  # :func:`digit_demo.models.in_bfloat16`
        self.box = nn.Linear(8 * width, 4) if box_head else None

    def read(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits and (with a box head, else None) the digit's box in crop fractions."""
        mean = crops.mean((1, 2, 3), keepdim=True)
        std = crops.std((1, 2, 3), keepdim=True)
        features = self.net[:-2]((crops - mean) / (std + 0.02))
        return self.net[-2:](features), (self.box(features) if self.box is not None else None)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.read(crops)[0]


def crop_fractions(boxes: torch.Tensor, around: torch.Tensor, context: float = CONTEXT) -> torch.Tensor:
    """xyxy ``boxes`` as fractions of the square crop taken around the boxes ``around``."""
    sq = square_boxes(around, context)
    side = (sq[:, 2:] - sq[:, :2]).repeat(1, 2)
    return (boxes - sq[:, :2].repeat(1, 2)) / side


def from_crop_fractions(fractions: torch.Tensor, around: torch.Tensor, context: float = CONTEXT) -> torch.Tensor:
    """The inverse of :func:`crop_fractions`: crop fractions back to xyxy image pixels."""
    sq = square_boxes(around, context)
    return sq[:, :2].repeat(1, 2) + fractions * (sq[:, 2:] - sq[:, :2]).repeat(1, 2)


def cluster(dets: Detections, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Group boxes on the same spot whatever digit they claim: returns the leaders (best box of each
    group) and, per detection, the index of its group."""
    boxes = torch.from_numpy(dets.boxes).float()
    leaders = nms(boxes, torch.from_numpy(dets.scores).float(), iou).numpy()
    groups = box_iou(boxes, boxes[leaders]).argmax(1).numpy()
    groups[leaders] = np.arange(len(leaders))
    return leaders, groups


def spots(dets: Detections, min_score: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The places the detector found a digit, whatever digit it claims: each group's best box
    (:func:`cluster`) and its presence, ``min(1, sum over digits of the detector's best score)``;
    spots with presence under ``min_score`` are left out."""
    if not len(dets):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    leaders, groups = cluster(dets)
    scores = np.zeros((len(leaders), 10), np.float32)
    np.maximum.at(scores, (groups, dets.digits), dets.scores)
    presence = np.minimum(scores.sum(1), 1.0)
    keep = presence >= min_score
    return dets.boxes[leaders][keep], presence[keep]


@torch.inference_mode()
def refine(reader: DigitReader, image: torch.Tensor, dets: Detections, min_score: float = 0.05,
           top_k: int = 2, box_blend: float | None = None, verify: float | None = None) -> Detections:
    """Let ``reader`` say which digit sits at each :func:`spot <spots>` the detector found.

    The reader reads a crop around the spot's box: digit ``d`` scores
    ``presence ** (1 - verify) * (1 - p(background)) ** verify * p(d | a digit)``, so ``verify``
    (default: the reader's own, 0 for readers trained without the detector's false boxes) is how far
    the reader's own "is there a digit" overrides the detector's. Each spot keeps its ``top_k``
    digits (the runner-up helps mAP). On ``valid`` with resnet18_fpn, the reader's digit alone beat
    blends with the detector's own digit scores (geometric means weighting the reader 0.5-0.9).
    """
    boxes, presence = spots(dets, min_score)
    if not len(boxes):
        return Detections()
    verify = reader.settings.verify if verify is None else verify
    box_blend = reader.settings.box_blend if box_blend is None else box_blend
    logits, where = reader.read(crop_digits(image, torch.from_numpy(boxes)))
    p = logits.softmax(1).numpy()
    digit = p[:, :BACKGROUND].sum(1, keepdims=True)
    if where is not None and box_blend:  # move the box towards where the reader sees the digit
        boxes = (1 - box_blend) * boxes + box_blend * from_crop_fractions(where, torch.from_numpy(boxes)).numpy()
    final = presence[:, None] ** (1 - verify) * digit ** verify * p[:, :BACKGROUND] / digit
    k = min(top_k, BACKGROUND)
    top = np.argsort(-final, 1)[:, :k]
    rows = np.repeat(np.arange(len(boxes)), k)
    out = Detections(boxes[rows].astype(np.float32), final[rows, top.ravel()].astype(np.float32),
                     top.ravel().astype(np.int64))
    return out.select(np.argsort(-out.scores, kind="stable"))


def save_reader(model: DigitReader, path: str | Path, meta: dict) -> Path:
    """Write the reader as fp16 safetensors plus its JSON sidecar."""
    fields = {
        "config": {"width": model.width, "crop": CROP, "context": CONTEXT, "box_head": model.box is not None,
                   "verify": model.settings.verify},
        "classes": {str(d): str(d) for d in range(10)} | {str(BACKGROUND): "background"},
        "normalisation": "per crop: zero mean, unit variance",
        "tuned": {"box_blend": model.settings.box_blend, "chosen_on": "valid"},
    }
    return write_weights(model, path, READER_ARCHITECTURE, fields, meta)


def load_reader(name_or_path: str | Path = DEFAULT_READER) -> DigitReader:
    """Load a reader checkpoint (fp32, eval mode); :class:`CheckpointError` when it is not one."""
    def build(meta: dict) -> DigitReader:
        config = meta["config"]
        return DigitReader(int(config.get("width", 32)), box_head=bool(config.get("box_head")),
                           settings=tuned(meta, RefineSettings, verify=config.get("verify", 0.0)))

    return load_module(name_or_path, READER_ARCHITECTURE, build, "digit reader")


def optional_reader(name: str | Path | None = DEFAULT_READER, precision: str | None = None) -> DigitReader | None:
    """The reader to use, ready for inference in ``precision`` (:func:`digit_demo.models.for_inference`):
    none for ``None`` or where the default one is not shipped; any other name must load."""
    path = resolve_optional(name, DEFAULT_READER)
    return for_inference(load_reader(path), precision) if path else None
