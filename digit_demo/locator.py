"""The locate stage: where in a whole photo the house number is.

A small fully convolutional network (``Locator``) reads the photo shrunk to ``INPUT_SIDE`` px on its
long side and predicts, on a grid of stride 8, how likely each cell is the centre of a house-number
region (the union of its digits' boxes), the centre's offset inside the cell and the region's size
(CenterNet-style). :func:`locate` turns that into scored regions in the photo's pixels, and
:func:`reading_box` pads a region into the crop the readers expect (digits filling about two thirds
of its height, as in SVHN's photos).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from .checkpoints import load_module, resolve_optional, tuned, write_weights
from .inference import for_inference

LOCATOR_ARCHITECTURE = "number_locator_centernet"
DEFAULT_LOCATOR = "locator"
INPUT_SIDE = 384  # the long side the locator reads a photo at
STRIDE = 8
# Photos whose short side is below this are read whole, as crops: SVHN's photos are at most 417 px on
# their short side (269 in valid), a phone photo 1200 px or more.
MIN_PHOTO_SIDE = 600


# A region is read from a crop around it: padded by these shares of its height above and below, and of
# its height left and right, so that its digits fill about two thirds of the crop's height, as the
# readers saw them in SVHN's photos (digits 34-75% of the height, median 66%, in train.json).
PAD_Y, PAD_X = 0.25, 0.5


@dataclass(frozen=True)
class LocateSettings:
    """How a locator's regions are read (tuned with the locator): a region's least centre score
    ``min_score``, the crop's ``pad`` (x, y) in shares of the region's height (:func:`reading_box`), and
    ``rank_power``: regions rank by their reading's confidence x the locator's score ** rank_power."""

    min_score: float = 0.3
    pad: tuple[float, float] = (PAD_X, PAD_Y)
    rank_power: float = 0.0


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Locator(nn.Module):
    """Photo (float RGB in [0, 1], standardised per image) to a stride-8 map of five channels: the
    centre logit, the centre's x / y offset in its cell (0-1) and the region's log width / height in
    cells."""

    bfloat16_parts = ("body",)  # :func:`digit_demo.inference.in_bfloat16`

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = w = width
        self.body = nn.Sequential(
            _conv(3, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w), _conv(2 * w, 4 * w, 2),
            _conv(4 * w, 4 * w, dilation=2), _conv(4 * w, 4 * w, dilation=4), _conv(4 * w, 4 * w, dilation=8),
            _conv(4 * w, 4 * w))
        self.head = nn.Conv2d(4 * w, 5, 1)
        nn.init.constant_(self.head.bias[0], -4.0)  # centres are rare: start near p = 0.02
        self.settings = LocateSettings()  # how its regions are read (a loaded locator: its sidecar's ``tuned``)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean((1, 2, 3), keepdim=True)
        std = images.std((1, 2, 3), keepdim=True)
        return self.head(self.body((images - mean) / (std + 0.02)))


def input_size(width: int, height: int, side: int = INPUT_SIDE) -> tuple[int, int]:
    """The (width, height) a ``width`` x ``height`` photo is read at: long side ``side``, each a
    multiple of STRIDE."""
    scale = side / max(width, height)
    return (max(STRIDE, round(width * scale / STRIDE) * STRIDE), max(STRIDE, round(height * scale / STRIDE) * STRIDE))


@dataclass
class Region:
    """A located house number: its xyxy box in the photo's pixels and the locator's score."""

    box: np.ndarray
    score: float


def regions_from_map(out: torch.Tensor, scale_x: float, scale_y: float, min_score: float = 0.3, top_k: int = 3,
           iou: float = 0.3) -> list[Region]:
    """Regions from one map (5 x H x W): peaks of the centre map (3 x 3 maxima) scoring at least
    ``min_score``, at most ``top_k`` after NMS at ``iou``, boxes scaled by ``scale_x`` / ``scale_y``
    from the locator's input pixels to the photo's."""
    heat = out[0].sigmoid()
    peaks = (heat == F.max_pool2d(heat[None, None], 3, 1, 1)[0, 0]) & (heat >= min_score)
    ys, xs = torch.nonzero(peaks, as_tuple=True)
    if not len(ys):
        return []
    cx = (xs.float() + out[1, ys, xs].clamp(0, 1)) * STRIDE
    cy = (ys.float() + out[2, ys, xs].clamp(0, 1)) * STRIDE
    w = out[3, ys, xs].clamp(-2, 6).exp() * STRIDE
    h = out[4, ys, xs].clamp(-2, 6).exp() * STRIDE
    boxes = torch.stack([(cx - w / 2) * scale_x, (cy - h / 2) * scale_y, (cx + w / 2) * scale_x, (cy + h / 2) * scale_y], 1)
    scores = heat[ys, xs]
    keep = nms(boxes, scores, iou)[:top_k]
    return [Region(boxes[k].numpy().astype(np.float32), float(scores[k])) for k in keep]


@torch.inference_mode()
def locate(model: Locator, small: torch.Tensor, photo_size: tuple[int, int], min_score: float | None = None) -> list[Region]:
    """The house-number regions in a photo of ``photo_size`` (width, height), read from ``small``, the
    photo shrunk to :func:`input_size` (float CHW in [0, 1]), scoring at least ``min_score`` (default:
    the locator's); best first, boxes in the photo's pixels."""
    out = model(small[None])[0]
    sx, sy = photo_size[0] / small.shape[2], photo_size[1] / small.shape[1]
    return regions_from_map(out, sx, sy, model.settings.min_score if min_score is None else min_score)


def reading_box(region: np.ndarray, width: int, height: int, pad: tuple[float, float] = (PAD_X, PAD_Y)
                ) -> tuple[int, int, int, int]:
    """The integer crop (x1, y1, x2, y2) around an xyxy ``region``, inside a ``width`` x ``height``
    photo: the region padded by ``pad`` (x, y) shares of its height on each side."""
    x1, y1, x2, y2 = (float(v) for v in region)
    h = max(y2 - y1, 1.0)
    box = (x1 - pad[0] * h, y1 - pad[1] * h, x2 + pad[0] * h, y2 + pad[1] * h)
    x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x2, y2 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
    return x1, y1, max(x1 + 1, x2), max(y1 + 1, y2)


def save_locator(model: Locator, path: str | Path, meta: dict) -> Path:
    """Write the locator as fp16 safetensors plus its JSON sidecar."""
    fields = {"config": {"width": model.width, "input_side": INPUT_SIDE, "stride": STRIDE},
              "classes": {"0": "house-number region centre"},
              "normalisation": "per image: zero mean, unit variance",
              "tuned": {"min_score": model.settings.min_score, "pad": list(model.settings.pad),
                        "rank_power": model.settings.rank_power,
                        "chosen_on": "tuning scenes (held-back train crops, training backgrounds)"}}
    return write_weights(model, path, LOCATOR_ARCHITECTURE, fields, meta)


def load_locator(name_or_path: str | Path = DEFAULT_LOCATOR) -> Locator:
    """Load a locator (fp32, eval mode); :class:`CheckpointError` when it is not one."""
    def build(meta: dict) -> Locator:
        model = Locator(int(meta["config"]["width"]))
        model.settings = tuned(meta, LocateSettings)
        return model

    return load_module(name_or_path, LOCATOR_ARCHITECTURE, build, "locator")


def optional_locator(name: str | Path | None = DEFAULT_LOCATOR, precision: str | None = None) -> Locator | None:
    """The locator to use, ready for inference: none for ``None`` or where the default is not shipped."""
    path = resolve_optional(name, DEFAULT_LOCATOR)
    return for_inference(load_locator(path), precision) if path else None

