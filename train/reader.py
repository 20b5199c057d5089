"""Train the digit reader (the second stage of :mod:`digit_demo.reader`).

Each epoch crops every digit of ``train.json`` (plus ``--extra-json`` images) around a jittered box,
as a detector's boxes are never exact, and as many background crops beside and between the digits;
the reader learns digit 0-9 or background and (its box head, smooth L1 weighted by ``--box-weight``)
where the true digit box sits in the crop. Validated on ``valid`` (gt boxes and background crops;
jittered gt boxes for the box head), the best epoch is exported as a checkpoint (fp16 safetensors + sidecar).
With ``--hard-negatives DETECTOR`` it also learns from that detector's spots on the training images (its
false boxes as background), and then picks :func:`digit_demo.reader.refine`'s ``verify`` weight on ``valid``.

    python -m train.reader --epochs 20 --extra-json runs/pseudo/unlabeled_r4_m8.json --hard-negatives resnet18_fpn
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou
from tqdm import tqdm

from digit_demo.data import DigitDataset, load_coco
from digit_demo.detect import Detector, set_threads, to_tensor
from digit_demo.evaluation import best as best_row
from digit_demo.evaluation import sweep
from digit_demo.images import load_image
from digit_demo.reader import (BOX_BLEND, BACKGROUND, DEFAULT_READER, DigitReader, crop_digits, crop_fractions,
                               load_reader, refine, save_reader, spots)

from . import engine
from .cli import DATA_SOURCE, add_data_args
from .synth import set_paths

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 CHW image, xyxy boxes, digits 0-9


def load_samples(root: Path, ann_file: Path, limit: int | None = None) -> list[Sample]:
    """Decoded images with their digit boxes (kept in memory: SVHN photos are small)."""
    data = DigitDataset(root, ann_file, limit=limit)
    samples = (data[i] for i in range(len(data)))
    return [(image.as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor), target["labels"] - 1)
            for image, target in samples if len(target["boxes"])]


def jitter(boxes: torch.Tensor, g: torch.Generator, shift: float = 0.1, scale: float = 0.16) -> torch.Tensor:
    """Boxes moved and resized a little, as a detector's would be."""
    wh = boxes[:, 2:] - boxes[:, :2]
    c = (boxes[:, :2] + boxes[:, 2:]) / 2 + torch.randn(boxes.shape[0], 2, generator=g) * shift * wh
    wh = wh * torch.exp(torch.randn(boxes.shape[0], 2, generator=g) * scale)
    return torch.cat([c - wh / 2, c + wh / 2], 1)


def background_boxes(boxes: torch.Tensor, height: int, width: int, n: int, g: torch.Generator,
                     max_iou: float = 0.25) -> torch.Tensor:
    """Up to ``n`` digit-sized boxes that overlap no digit by more than ``max_iou``: half beside
    the digits (shifted sideways), half anywhere in the photo."""
    wh = boxes[:, 2:] - boxes[:, :2]
    k = 4 * n
    pick = torch.randint(len(boxes), (k,), generator=g)
    side = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    dx = side * (0.5 + torch.rand(k, generator=g)) * wh[pick, 0]
    beside = boxes[pick] + torch.stack([dx, torch.zeros(k), dx, torch.zeros(k)], 1)
    h = wh[:, 1].median() * (0.6 + 0.8 * torch.rand(k, generator=g))
    w = h * (0.35 + 0.4 * torch.rand(k, generator=g))
    x = torch.rand(k, generator=g) * (width - w).clamp(min=1)
    y = torch.rand(k, generator=g) * (height - h).clamp(min=1)
    anywhere = torch.stack([x, y, x + w, y + h], 1)
    cand = torch.cat([beside[: k // 2], anywhere[: k // 2]])
    inside = (cand[:, 0] > -0.3 * (cand[:, 2] - cand[:, 0])) & (cand[:, 2] < width + 0.3 * (cand[:, 2] - cand[:, 0]))
    ok = inside & (box_iou(cand, boxes).amax(1) < max_iou)
    return cand[ok][:n]


Spots = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a detector's spot boxes, their labels, true boxes


@torch.inference_mode()
def mine(det: Detector, samples: list[Sample], fg_iou: float = 0.5, bg_iou: float = 0.3,
         quiet: bool = False) -> list[Spots]:
    """The spots ``det`` (a detector without reader) finds on each image (:func:`digit_demo.reader.spots`, as the reader
    will see them), labelled by the true boxes: the digit of a box they overlap by ``fg_iou`` or
    more (with that true box), background where they overlap none by ``bg_iou`` (the detector's
    false boxes: hard negatives), left out in between."""
    out = []
    for image, boxes, digits in tqdm(samples, desc=f"mining {det.name}", unit="img", disable=quiet):
        found = torch.from_numpy(spots(det.detect_tensors([image.float().div(255)])[0])[0])
        iou, match = box_iou(found, boxes).max(1)
        labels = torch.where(iou >= fg_iou, digits[match], BACKGROUND)
        keep = (iou >= fg_iou) | (iou < bg_iou)
        out.append((found[keep], labels[keep], boxes[match][keep]))
    return out


def make_crops(samples: list[Sample], g: torch.Generator, jittered: bool = True, neg_ratio: float = 1.0,
               mined: list[Spots] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One epoch of crops: every digit (around a ``jittered`` box), as many background crops and
    the ``mined`` detector spots; their labels, and where each digit's true box and the box it was
    cropped around sit in its crop (crop fractions, zeros for background)."""
    crops, labels, where, given = [], [], [], []
    for k, (image, boxes, digits) in enumerate(samples):
        img = image.float().div(255)
        pos = jitter(boxes, g) if jittered else boxes
        neg = background_boxes(boxes, img.shape[1], img.shape[2], max(1, round(neg_ratio * len(boxes))), g)
        spot, spot_labels, spot_truth = mined[k] if mined else (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                                                                  torch.zeros(0, 4))
        is_digit = (spot_labels != BACKGROUND)[:, None]
        spot_where = torch.where(is_digit, crop_fractions(spot_truth, spot), 0.0)
        spot_given = torch.where(is_digit, crop_fractions(spot, spot), 0.0)
        crops.append(crop_digits(img, torch.cat([pos, neg, spot])))
        labels.append(torch.cat([digits, torch.full((len(neg),), BACKGROUND), spot_labels]))
        where.append(torch.cat([crop_fractions(boxes, pos), torch.zeros(len(neg), 4), spot_where]))
        given.append(torch.cat([crop_fractions(pos, pos), torch.zeros(len(neg), 4), spot_given]))
    return torch.cat(crops), torch.cat(labels), torch.cat(where), torch.cat(given)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Colour changes the per-crop standardisation does not undo: inversion, grey, channel order, noise."""
    n = x.shape[0]
    invert = torch.rand(n, generator=g) < 0.2
    x = torch.where(invert[:, None, None, None], 1 - x, x)
    grey = torch.rand(n, generator=g) < 0.15
    x = torch.where(grey[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)
    perm = torch.rand(n, generator=g) < 0.2
    x = torch.where(perm[:, None, None, None], x[:, torch.randperm(3, generator=g)], x)
    return x + torch.randn(x.shape, generator=g) * 0.02 * torch.rand(n, 1, 1, 1, generator=g)


@torch.inference_mode()
def accuracy(model: DigitReader, crops: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy on digit crops and on background crops."""
    model.eval()
    pred = torch.cat([model(crops[i : i + 512]).argmax(1) for i in range(0, len(crops), 512)])
    digit = labels != BACKGROUND
    return (pred[digit] == labels[digit]).float().mean().item(), (pred[~digit] == BACKGROUND).float().mean().item()


@torch.inference_mode()
def tune_verify(model: DigitReader, det: Detector, data: Path, val_json: str, val_images: str,
                values: list[float]) -> list[dict]:
    """Whole-number accuracy and mAP on ``valid`` at the best threshold for each ``verify`` value of
    :func:`digit_demo.reader.refine`, with the boxes of ``det`` (a detector without reader); best first."""
    model.eval()
    gt = load_coco(data / val_json)
    tensors = {im["id"]: to_tensor(load_image(data / val_images / im["file_name"])) for im in gt["images"]}
    raw = {i: det.detect_tensors([t])[0] for i, t in tensors.items()}
    rows = []
    for v in values:
        b = best_row(sweep(gt, {i: refine(model, tensors[i], d, verify=v) for i, d in raw.items()}))
        rows.append({"verify": v, "threshold": b.threshold, "accuracy": b.accuracy, "mAP": b.mAP})
    return sorted(rows, key=lambda r: (-round(r["accuracy"], 6), -round(r["mAP"], 6), r["verify"]))


@torch.inference_mode()
def box_ious(model: DigitReader, crops: torch.Tensor, labels: torch.Tensor, where: torch.Tensor, given: torch.Tensor,
             blend: float = BOX_BLEND) -> tuple[float, float]:
    """Mean IoU with the true digit box of the (jittered) boxes the digit crops were taken around,
    and of those boxes moved by the box head as :func:`digit_demo.reader.refine` does."""
    model.eval()
    digit = labels != BACKGROUND
    crops, truth, given = crops[digit], where[digit], given[digit]
    read = torch.cat([model.read(crops[i : i + 512])[1] for i in range(0, len(crops), 512)])
    moved = (1 - blend) * given + blend * read
    return box_iou(given, truth).diag().mean().item(), box_iou(moved, truth).diag().mean().item()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.reader", description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--box-weight", type=float, default=5.0,
                   help="weight of the box head's loss (where the digit sits in its crop); 0: no box head")
    p.add_argument("--hard-negatives", metavar="DETECTOR",
                   help="also train on this detector's spots on the training images (its false boxes as background) "
                        "and pick refine's verify weight for it on valid")
    p.add_argument("--verify", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="verify weights to try with --hard-negatives (the best on valid is stored)")
    add_run_args(p, DEFAULT_READER)
    return p


def add_run_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """The options every second-stage trainer shares: data size, threads, seed, export path, quiet."""
    p.add_argument("--limit", type=int, default=None, help="use only the first N train images (tests)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs") / default_out / default_out,
                   help="checkpoint path to export to (checkpoints/ takes it by copying, then the release step)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-resume", action="store_true", help="start over even where the export's folder holds a state")


class RunState:
    """The state a second-stage trainer resumes from: ``<export>.last.pt`` beside its export, written
    after each epoch with :func:`train.engine.save_state`. A state left by a run with other options
    is ignored: rerun the same command to resume."""

    def __init__(self, args: argparse.Namespace):
        self.path = Path(args.out).with_name(Path(args.out).with_suffix("").name + ".last.pt")
        self.recipe = {k: str(v) for k, v in sorted(vars(args).items()) if k not in ("threads", "quiet", "no_resume")}
        self.fresh = args.no_resume

    def load(self, model, opt, sched, g: torch.Generator) -> dict | None:
        """Restore ``model``, ``opt``, ``sched`` and ``g`` and return the saved progress, or None to start over."""
        if self.fresh or not self.path.is_file():
            return None
        state = engine.read_state(self.path)
        if state.get("recipe") != self.recipe:
            print(f"{self.path}: left by a run with other options; starting over", file=sys.stderr)
            return None
        progress = engine.restore_state(state, model, opt, sched, g)
        print(f"resumed from {self.path} after epoch {progress['epoch']}", file=sys.stderr)
        return progress

    def save(self, model, opt, sched, g: torch.Generator, **progress) -> None:
        engine.save_state(self.path, model, opt, sched, g, recipe=self.recipe, **progress)


def sidecar_recipe(args: argparse.Namespace) -> dict:
    """A second-stage trainer's options as its sidecar records them: paths as text; where it reads the
    data and writes, its threads and its progress bars left out."""
    def text(v):
        return [text(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v

    return {k: text(v) for k, v in vars(args).items() if k not in ("data", "threads", "out", "quiet")}


def begin_run(args: argparse.Namespace) -> tuple[torch.Generator, list[Sample], dict]:
    """Set threads and seeds; the run's random generator, its training images (``train`` plus every
    ``--extra-json`` and ``--synthetic`` set) and what they are, for the sidecar."""
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    samples = load_samples(args.data / args.train_images, args.data / args.train_json, args.limit)
    data_info = {"train": args.train_json, "train_images": len(samples), "extra": [], "valid": args.val_json,
                 "source": DATA_SOURCE}
    for extra in args.extra_json:
        more = load_samples(args.data / args.extra_images, extra, args.limit)
        data_info["extra"].append({"json": str(extra), "images": args.extra_images, "count": len(more)})
        samples += more
    for folder in args.synthetic:
        images, labels = set_paths(folder)
        more = load_samples(images, labels, args.limit)
        data_info.setdefault("synthetic", []).append({"folder": str(folder), "count": len(more)})
        samples += more
    return torch.Generator().manual_seed(args.seed), samples, data_info


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    g, samples, data_info = begin_run(args)
    val_samples = load_samples(args.data / args.val_images, args.data / args.val_json)
    val_crops, val_labels, _, _ = make_crops(val_samples, torch.Generator().manual_seed(0), jittered=False)
    val_boxes = make_crops(val_samples, torch.Generator().manual_seed(1))  # jittered, for the box head
    mined = val_spots = None
    if args.hard_negatives:
        detector = Detector.load(args.hard_negatives, precision="fp32")  # as shipped
        mined = mine(detector, samples, quiet=args.quiet)
        val_mined = mine(detector, val_samples, quiet=args.quiet)
        val_spots = (torch.cat([crop_digits(im.float().div(255), m[0]) for (im, _, _), m in zip(val_samples, val_mined)]),
                     torch.cat([m[1] for m in val_mined]))
        data_info["hard_negatives"] = {"detector": args.hard_negatives,
                                       "train_spots": sum(len(m[1]) for m in mined),
                                       "train_false_boxes": sum(int((m[1] == BACKGROUND).sum()) for m in mined)}
    print(f"{len(samples)} training images, {len(val_crops)} validation crops", file=sys.stderr)
    model = DigitReader(args.width, box_head=args.box_weight > 0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    best, start, history = None, time.time(), []
    per_epoch = sum(len(b) for _, b, _ in samples) * 2 + sum(len(m[1]) for m in mined or [])
    steps = args.epochs * math.ceil(per_epoch / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps + args.epochs, pct_start=0.15)
    best_meta, first = None, 0
    run_state = RunState(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    extras = run_state.load(model, opt, sched, g)
    if extras:
        best, history, best_meta, first = extras["best"], extras["history"], extras["best_meta"], extras["epoch"]
        start -= extras["seconds"]
    for epoch in range(first, args.epochs):
        crops, labels, where, _ = make_crops(samples, g, mined=mined)
        model.train()
        order = torch.randperm(len(crops), generator=g)
        bar = tqdm(range(0, len(crops), args.batch_size), desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                   disable=args.quiet)
        for i in bar:
            idx = order[i : i + args.batch_size]
            logits, read = model.read(augment(crops[idx], g))
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=0.05)
            digit = labels[idx] != BACKGROUND
            if read is not None and digit.any():
                loss = loss + args.box_weight * F.smooth_l1_loss(read[digit], where[idx][digit], beta=0.02)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        digit_acc, bg_acc = accuracy(model, val_crops, val_labels)
        history.append({"epoch": epoch + 1, "digit_accuracy": digit_acc, "background_accuracy": bg_acc,
                        "seconds": time.time() - start})
        if val_spots is not None:
            history[-1]["spot_digit_accuracy"], history[-1]["spot_background_accuracy"] = accuracy(model, *val_spots)
        if model.box is not None:
            history[-1]["jittered_box_iou"], history[-1]["refined_box_iou"] = box_ious(model, *val_boxes)
        print(f"epoch {epoch + 1}: valid " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()
                                                       if k not in ("epoch", "seconds")), file=sys.stderr)
        if best is None or _score(history[-1]) > _score(best):
            best = history[-1]
            best_meta = {
                "training": {"epochs_run": epoch + 1, "train_seconds": round(time.time() - start), "device": "cpu",
                             "crops_per_epoch": len(crops)},
                "recipe": sidecar_recipe(args),
                "data": data_info,
                "metrics": {f"valid_{k}": v for k, v in best.items() if k not in ("epoch", "seconds")},
                "history": history,
            }
            save_reader(model, args.out, best_meta)
        run_state.save(model, opt, sched, g, epoch=epoch + 1, best=best, history=history, best_meta=best_meta,
                       seconds=time.time() - start)
    if args.hard_negatives:  # how far refine should trust the reader's background class, with this detector
        model = load_reader(args.out)
        rows = tune_verify(model, detector, args.data, args.val_json, args.val_images, args.verify)
        print("verify sweep on valid: " + "; ".join(f"{r['verify']}: {r['accuracy']:.3f} / mAP {r['mAP']:.3f}"
                                                     for r in rows), file=sys.stderr)
        model.settings = replace(model.settings, verify=rows[0]["verify"])
        save_reader(model, args.out, best_meta | {"verify_sweep": {"detector": args.hard_negatives, "rows": rows}})
    return 0


def _score(row: dict) -> float:
    """What picks the exported epoch: the sum of the validation accuracies (digits, background, spots)."""
    return sum(v for k, v in row.items() if k.endswith("accuracy"))


if __name__ == "__main__":
    sys.exit(main())
