"""Whole-number reader: a small CRNN (CNN + bidirectional GRU + CTC) that reads the house number
from one crop around the detected digits.

The detector and the digit reader judge each spot alone; this model reads the whole line at once,
so it sees that a thin "1" belongs to the number, or that a fence spike beside it does not.
:func:`digit_demo.assemble.assemble` uses it to choose among the numbers the detections allow.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import roi_align

from .assemble import BLANK, LINE_THRESHOLDS, Detections, assemble, is_column
from .checkpoints import load_module, resolve_optional, write_weights

HEIGHT, WIDTH = 32, 128  # the crop; WIDTH / 4 = 32 time steps
SEQUENCE_ARCHITECTURE = "number_reader_crnn"
DEFAULT_SEQUENCE = "number_reader"
PAD_X, PAD_Y = 0.4, 0.15  # region padding around the digits, in digit heights


def number_region(boxes: torch.Tensor, pad_x: float = PAD_X, pad_y: float = PAD_Y) -> torch.Tensor:
    """The xyxy box around digit ``boxes`` (N x 4), padded by ``pad_x`` / ``pad_y`` x their median height."""
    h = (boxes[:, 3] - boxes[:, 1]).median()
    lo, hi = boxes[:, :2].amin(0), boxes[:, 2:].amax(0)
    pad = torch.stack([pad_x * h, pad_y * h])
    return torch.cat([lo - pad, hi + pad])


def crop_boxes(regions: torch.Tensor) -> torch.Tensor:
    """Boxes of the crop's aspect (WIDTH : HEIGHT) centred on xyxy ``regions``, grown to hold them."""
    c = (regions[:, :2] + regions[:, 2:]) / 2
    w = (regions[:, 2] - regions[:, 0]).clamp(min=1)
    h = (regions[:, 3] - regions[:, 1]).clamp(min=1)
    aspect = WIDTH / HEIGHT
    h = torch.maximum(h, w / aspect)
    half = torch.stack([h * aspect, h], 1) / 2
    return torch.cat([c - half, c + half], 1)


def crop_at(image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """HEIGHT x WIDTH crops of a float CHW ``image`` resampled from xyxy ``boxes`` (zeros outside the photo)."""
    return roi_align(image[None], [boxes.float()], (HEIGHT, WIDTH), 1.0, sampling_ratio=0, aligned=True)


def crop_numbers(image: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """HEIGHT x WIDTH crops of a float CHW ``image`` around xyxy ``regions`` (:func:`crop_boxes`)."""
    return crop_at(image, crop_boxes(regions.float()))


def _block(cin: int, cout: int, pool: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(pool))


class NumberReader(nn.Module):
    """CNN over a standardised crop (zero mean, unit variance, as the digit reader) down to one row of
    WIDTH / 4 columns, a bidirectional GRU along it, and per-column log-probabilities of 0-9 or blank."""

    def __init__(self, width: int = 32, hidden: int = 128):
        super().__init__()
        self.width, self.hidden = width, hidden
        w = width
        self.cnn = nn.Sequential(
            _block(3, w, (2, 2)), _block(w, 2 * w, (1, 1)), _block(2 * w, 2 * w, (2, 2)),
            _block(2 * w, 4 * w, (1, 1)), _block(4 * w, 4 * w, (2, 1)), _block(4 * w, 8 * w, (2, 1)),
        )
        self.rnn = nn.GRU(8 * w, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * hidden, BLANK + 1))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Log-probabilities, N x T x 11."""
        mean = crops.mean((1, 2, 3), keepdim=True)
        std = crops.std((1, 2, 3), keepdim=True)
        f = self.cnn((crops - mean) / (std + 0.02)).mean(2).transpose(1, 2)  # N x T x C
        return self.head(self.rnn(f)[0]).log_softmax(2)


def decode(log_probs: torch.Tensor) -> list[str]:
    """Greedy CTC decoding of N x T x 11 log-probabilities."""
    out = []
    for path in log_probs.argmax(2).tolist():
        keep = [c for k, c in enumerate(path) if c != BLANK and (k == 0 or c != path[k - 1])]
        out.append("".join(map(str, keep)))
    return out


# The region the number reader reads: around the number assembled at this threshold (or, where none
# is, at the lowest), before the reader's own choice.
REGION_THRESHOLD = 0.3


@torch.inference_mode()
def read_line(model: NumberReader, image: torch.Tensor, dets: Detections) -> Detections:
    """``dets`` with ``model``'s reading of the line the digits sit on (``line``, which
    :func:`digit_demo.assemble.assemble` then uses); unchanged where no digit is found or the
    digits stand in a column (the reader reads rows)."""
    number = assemble(dets, REGION_THRESHOLD, line_margin=None)
    if not number.text:
        number = assemble(dets, min(LINE_THRESHOLDS), line_margin=None)
    if not number.text or is_column(number.digits.boxes):
        return dets
    region = number_region(torch.from_numpy(number.digits.boxes).float())
    return replace(dets, line=model(crop_numbers(image, region[None]))[0].numpy())


def save_sequence(model: NumberReader, path: str | Path, meta: dict) -> Path:
    """Write the number reader as fp16 safetensors plus its JSON sidecar."""
    fields = {"config": {"width": model.width, "hidden": model.hidden, "height": HEIGHT, "crop_width": WIDTH,
                         "pad": [PAD_X, PAD_Y]},
              "classes": {str(d): str(d) for d in range(10)} | {str(BLANK): "blank"},
              "normalisation": "per crop: zero mean, unit variance"}
    return write_weights(model, path, SEQUENCE_ARCHITECTURE, fields, meta)


def load_sequence(name_or_path: str | Path = DEFAULT_SEQUENCE) -> NumberReader:
    """Load a number reader (fp32, eval mode); :class:`CheckpointError` when it is not one."""
    return load_module(name_or_path, SEQUENCE_ARCHITECTURE,
                       lambda meta: NumberReader(int(meta["config"]["width"]), int(meta["config"]["hidden"])),
                       "number reader")


def optional_number_reader(name: str | Path | None = DEFAULT_SEQUENCE) -> NumberReader | None:
    """The number reader to use: none for ``None`` or where the default one is not shipped; any
    other name must load."""
    path = resolve_optional(name, DEFAULT_SEQUENCE)
    return load_sequence(path) if path else None
