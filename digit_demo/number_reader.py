"""Whole-number reader: a small CRNN (CNN + bidirectional GRU + CTC) that reads the house number
from one crop around the detected digits.

The detector and the digit reader judge each spot alone; this model reads the whole line at once,
so it sees that a thin "1" belongs to the number, or that a fence spike beside it does not.
:func:`digit_demo.assemble.assemble` uses it to choose among the numbers the detections allow, and
the number a second such model (the proposer, built on the digit reader's backbone) reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .assemble import is_column
from .checkpoints import load_module, resolve_optional, tuned, write_weights
from .inference import for_inference
from .reader import DigitReader, trunk
from .types import Detections

BLANK = 10  # the CTC blank (classes 0-9 are the digits)

HEIGHT, WIDTH = 32, 128  # the crop; WIDTH / 4 = 32 time steps
NUMBER_READER_ARCHITECTURE = "number_reader_crnn"
DEFAULT_NUMBER_READER = "number_reader"
DEFAULT_PROPOSER = "number_proposer"
LINE_PAD_X, LINE_PAD_Y = 0.4, 0.15  # the line region's padding around the digits, in digit heights


def number_region(boxes: torch.Tensor, pad_x: float = LINE_PAD_X, pad_y: float = LINE_PAD_Y) -> torch.Tensor:
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


BACKBONES = ("crnn", "reader")


def reader_trunk(width: int) -> nn.Sequential:
    """The digit reader's convolutional blocks (:class:`digit_demo.reader.DigitReader`, same weight
    names), the last one striding only down, so a HEIGHT x WIDTH crop gives 4 x WIDTH / 4 features.
    A line crop shows digits at the scale the digit reader reads them (about 25 px tall), so its
    trained weights are a head start (:meth:`NumberReader.init_from_reader`)."""
    return nn.Sequential(*trunk(width, (2, 1)))


class NumberReader(nn.Module):
    """CNN over a standardised crop (zero mean, unit variance, as the digit reader) down to WIDTH / 4
    columns, a bidirectional GRU along them, and per-column log-probabilities of 0-9 or blank.

    ``backbone`` "crnn" is a small CNN of its own; "reader" is the digit reader's (:func:`reader_trunk`)."""

    bfloat16_parts = ("cnn",)  # :func:`digit_demo.models.in_bfloat16`

    def __init__(self, width: int = 32, hidden: int = 128, backbone: str = "crnn"):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown number reader backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
        self.width, self.hidden, self.backbone = width, hidden, backbone
        w = width
        self.cnn = nn.Sequential(
            _block(3, w, (2, 2)), _block(w, 2 * w, (1, 1)), _block(2 * w, 2 * w, (2, 2)),
            _block(2 * w, 4 * w, (1, 1)), _block(4 * w, 4 * w, (2, 1)), _block(4 * w, 8 * w, (2, 1)),
        ) if backbone == "crnn" else reader_trunk(w)
        self.rnn = nn.GRU(8 * w, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * hidden, BLANK + 1))
        self.proposer: NumberReader | None = None  # a second reader whose reading joins the alternatives
        self.settings = LineSettings()  # tuned with this reader (its sidecar's ``tuned``)

    def init_from_reader(self, reader: DigitReader) -> None:
        """Start the "reader" backbone from a trained digit reader's convolutional blocks."""
        if self.backbone != "reader" or reader.width != self.width:
            raise ValueError("only a 'reader' backbone of the digit reader's width starts from its weights")
        self.cnn.load_state_dict(reader.net[: len(self.cnn)].state_dict())

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Log-probabilities, N x T x 11."""
        mean = crops.mean((1, 2, 3), keepdim=True)
        std = crops.std((1, 2, 3), keepdim=True)
        f = self.cnn((crops - mean) / (std + 0.02)).mean(2).transpose(1, 2)  # N x T x C
        return self.head(self.rnn(f)[0]).log_softmax(2)


def greedy_runs(path: list[int]) -> list[list[int]]:
    """The time steps of each character a greedy CTC ``path`` (the best class per step) reads: a
    run of one non-blank class, ended by a blank or another class."""
    runs: list[list[int]] = []
    for k, c in enumerate(path):
        if c != BLANK:
            if k and c == path[k - 1]:
                runs[-1].append(k)
            else:
                runs.append([k])
    return runs


def greedy_text(log_probs: torch.Tensor) -> list[str]:
    """Greedy CTC decoding of N x T x 11 log-probabilities."""
    return ["".join(str(path[r[0]]) for r in greedy_runs(path)) for path in log_probs.argmax(2).tolist()]


def place(log_probs: torch.Tensor, crop: torch.Tensor, digit_boxes: torch.Tensor) -> Detections:
    """The greedy reading of T x 11 ``log_probs`` as digits on the line: each at the centre of the
    columns it was read in (mapped through the xyxy ``crop`` box), as wide, tall and high as the median
    of ``digit_boxes``; scored by its highest probability there."""
    best, path = log_probs.max(1)
    runs = greedy_runs(path.tolist())
    if not runs:
        return Detections()
    step = (crop[2] - crop[0]) / len(path)
    cx = torch.tensor([crop[0] + (sum(r) / len(r) + 0.5) * step for r in runs])
    w, h = (digit_boxes[:, 2:] - digit_boxes[:, :2]).median(0).values
    cy = ((digit_boxes[:, 1] + digit_boxes[:, 3]) / 2).median()
    cy = torch.full_like(cx, float(cy))
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    return Detections(boxes.numpy().astype("float32"), torch.stack([best[r].max() for r in runs]).exp().numpy(),
                      path[[r[0] for r in runs]].numpy())


# The region the number reader reads: around the number assembled at this threshold (or, where none
# is, at the lowest), before the reader's own choice (:func:`digit_demo.pipeline.read_number_line`).
REGION_THRESHOLD = 0.3
# Another reading replaces the one at the chosen threshold when the reader finds it more likely by this
# many nats (:func:`digit_demo.assemble.assemble`). On valid (resnet18_fpn + digit reader, threshold 0.30),
# margins of 2-6 all read more numbers than none; 3 is inside that range.
LINE_MARGIN = 3.0



@dataclass(frozen=True)
class LineSettings:
    """How a number reader's line reading is used (tuned with the reader): the ``region_threshold`` at
    which the detections' number marks the line it reads, and the ``line_margin`` in nats by which another
    reading must be likelier to replace the threshold's (:func:`digit_demo.judge.by_line`)."""

    region_threshold: float = REGION_THRESHOLD
    line_margin: float = LINE_MARGIN

@torch.inference_mode()
def read_region(model: NumberReader, image: torch.Tensor, digit_boxes: torch.Tensor, text: str
                ) -> tuple[np.ndarray, Detections | None]:
    """``model``'s reading of the line around xyxy ``digit_boxes`` (N x 4) of a float CHW ``image``,
    on which the detections read ``text``: the T x 11 log-probabilities, and, where ``model`` has a
    proposer, the number that reads there (:func:`place`; else None). A vertical stack is read top to
    bottom, its digits laid side by side (:func:`column_as_row`), without the proposer.

    The proposer is asked only where ``model``'s own greedy reading differs from ``text``: where the
    two agree (about 72% of the valid images with resnet18_fpn) its proposal changed no reading, so
    its time is saved."""
    column = is_column(digit_boxes.numpy())
    if column:
        image, digit_boxes = column_as_row(image, digit_boxes)
    crop = crop_boxes(number_region(digit_boxes)[None])
    x = crop_at(image, crop)
    line = model(x)[0]
    proposal = None
    if model.proposer is not None and not column and greedy_text(line[None])[0] != text:
        proposal = place(model.proposer(x)[0], crop[0], digit_boxes)
    return line.numpy(), proposal


def column_as_row(image: torch.Tensor, boxes: torch.Tensor, gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A vertical stack's digits (xyxy ``boxes`` in a float CHW ``image``) laid side by side, top to
    bottom becoming left to right, as the number reader reads a row: each box cut out at the stack's
    median digit height, ``gap`` of it apart, on the image's mean colour (with room around them for
    the line's padding); the row image and its boxes.
    Spacing matters: SVHN's digits stand close, and the reader misses digits set far apart."""
    boxes = boxes[torch.argsort((boxes[:, 1] + boxes[:, 3]) / 2)].float()
    side = max(8, int(round(float((boxes[:, 3] - boxes[:, 1]).median()))))
    widths = [max(1, int(round(side * float((b[2] - b[0]) / (b[3] - b[1]).clamp(min=1))))) for b in boxes]
    cuts = [roi_align(image[None], [b[None]], (side, w), 1.0, sampling_ratio=0, aligned=True)[0] for b, w in zip(boxes, widths)]
    space = int(round(gap * side))
    fill = image.mean((1, 2), keepdim=True)
    margin = fill.expand(-1, side, side)  # room for the line's padding
    parts = [margin]
    for k, c in enumerate(cuts):
        parts += [c] if k == 0 else [margin[:, :, :space], c]
    row = torch.cat(parts + [margin], 2)
    above = fill.expand(-1, side // 2, row.shape[2])
    row = torch.cat([above, row, above], 1)
    x = torch.tensor([side + sum(widths[:k]) + k * space for k in range(len(widths))], dtype=torch.float32)
    w = torch.tensor(widths, dtype=torch.float32)
    top = float(side // 2)
    row_boxes = torch.stack([x, torch.full_like(x, top), x + w, torch.full_like(x, top + side)], 1)
    return row, row_boxes


def ctc_nll(log_probs: torch.Tensor, texts: list[str], **kwargs) -> torch.Tensor:
    """CTC negative log-likelihood of ``texts`` (digit strings) under T x N x 11 ``log_probs``, one
    column per text, every time step used; ``kwargs`` go to :func:`torch.nn.functional.ctc_loss`."""
    targets = torch.tensor([int(c) for t in texts for c in t], dtype=torch.long)
    return F.ctc_loss(log_probs, targets, torch.full((len(texts),), log_probs.shape[0], dtype=torch.long),
                      torch.tensor([len(t) for t in texts], dtype=torch.long), blank=BLANK, **kwargs)


def line_log_prob(line: np.ndarray, texts: list[str]) -> np.ndarray:
    """log p(text) for each of ``texts`` under a number reader's T x 11 ``line`` log-probabilities
    (CTC: summed over every alignment; the empty text is the all-blank path)."""
    lp = torch.from_numpy(line).float()[:, None].expand(-1, len(texts), -1)
    return (-ctc_nll(lp, texts, reduction="none")).detach().numpy()



def save_number_reader(model: NumberReader, path: str | Path, meta: dict) -> Path:
    """Write the number reader as fp16 safetensors plus its JSON sidecar."""
    fields = {"config": {"width": model.width, "hidden": model.hidden, "backbone": model.backbone,
                         "height": HEIGHT, "crop_width": WIDTH,
                         "pad": [LINE_PAD_X, LINE_PAD_Y]},
              "classes": {str(d): str(d) for d in range(10)} | {str(BLANK): "blank"},
              "normalisation": "per crop: zero mean, unit variance",
              "tuned": {"region_threshold": model.settings.region_threshold, "line_margin": model.settings.line_margin,
                        "chosen_on": "valid"}}
    return write_weights(model, path, NUMBER_READER_ARCHITECTURE, fields, meta)


def load_number_reader(name_or_path: str | Path = DEFAULT_NUMBER_READER) -> NumberReader:
    """Load a number reader (fp32, eval mode); :class:`CheckpointError` when it is not one."""
    def build(meta: dict) -> NumberReader:
        model = NumberReader(int(meta["config"]["width"]), int(meta["config"]["hidden"]),
                             str(meta["config"].get("backbone", "crnn")))
        model.settings = tuned(meta, LineSettings)
        return model

    return load_module(name_or_path, NUMBER_READER_ARCHITECTURE, build, "number reader")


def optional_number_reader(name: str | Path | None = DEFAULT_NUMBER_READER,
                           proposer: str | Path | None = DEFAULT_PROPOSER,
                           precision: str | None = None) -> NumberReader | None:
    """The number reader to use, with its ``proposer``, ready for inference in ``precision``
    (:func:`digit_demo.models.for_inference`): none for ``None`` or where the default one is not
    shipped; any other name must load."""
    path = resolve_optional(name, DEFAULT_NUMBER_READER)
    if not path:
        return None
    model = load_number_reader(path)
    other = resolve_optional(proposer, DEFAULT_PROPOSER)
    if other:
        model.proposer = load_number_reader(other)
    return for_inference(model, precision)
