"""Train the whole-number reader (:mod:`digit_demo.number_reader`).

Each epoch crops every number of ``train.json`` (plus ``--extra-json`` images) around its digit
boxes, padded and shifted at random, as boxes a detector finds would be; the model learns the digit
string with CTC. Validated on ``valid`` (number crops around the true boxes) each epoch; the best
epoch is exported (fp16 safetensors + sidecar).

    python -m train.number_reader --epochs 30 --extra-json runs/pseudo/unlabeled_r4_m8.json
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from digit_demo.assemble import reading_order
from digit_demo.judge import read
from digit_demo.calibration import threshold_for
from digit_demo.data import load_coco
from digit_demo.detect import to_tensor
from digit_demo.images import load_image
from digit_demo.pipeline import Pipeline, PipelineConfig
from digit_demo.types import Detections
from digit_demo.reader import DEFAULT_READER, load_reader
from digit_demo.number_reader import (BACKBONES, DEFAULT_NUMBER_READER, HEIGHT, WIDTH, NumberReader, crop_at, crop_boxes,
                                      crop_numbers, ctc_nll, greedy_text, number_region, save_number_reader)

from .cli import add_data_args
from .reader import RunState, Sample, add_run_args, augment, begin_run, load_samples, sidecar_recipe


def ordered(sample: Sample) -> tuple[torch.Tensor, str] | None:
    """The sample's digit boxes and its number in reading order; None for vertical numbers (the
    reader reads rows only)."""
    _, boxes, digits = sample
    dets = reading_order(Detections(boxes.numpy(), torch.ones(len(boxes)).numpy(), digits.numpy()))
    b = torch.from_numpy(dets.boxes)
    if len(b) > 1 and (b[1:, 0] + b[1:, 2] <= b[:-1, 0] + b[:-1, 2]).any():
        return None
    if len(b) > 1 and ((b[:, 1] + b[:, 3]).max() - (b[:, 1] + b[:, 3]).min()) / 2 > (b[:, 3] - b[:, 1]).median():
        return None  # a column, or a diagonal
    return b, "".join(str(int(d)) for d in dets.digits)


def make_crops(samples: list[Sample], g: torch.Generator | None) -> tuple[torch.Tensor, list[str]]:
    """One crop per number: around its true boxes, padded, shifted, stretched and blurred at random
    (``g``), or with the reader's own padding (``g`` None)."""
    crops, texts = [], []
    for sample in samples:
        found = ordered(sample)
        if found is None:
            continue
        boxes, text = found
        image = sample[0].float().div(255)
        if g is None:
            crops.append(crop_numbers(image, number_region(boxes)[None]))
        else:
            pad = torch.rand(2, generator=g) * torch.tensor([0.8, 0.3]) + torch.tensor([0.05, 0.0])
            region = number_region(boxes, float(pad[0]), float(pad[1]))
            h = (boxes[:, 3] - boxes[:, 1]).median()
            box = crop_boxes((region + (torch.randn(2, generator=g) * 0.08 * h).repeat(2))[None])
            c, half = (box[:, :2] + box[:, 2:]) / 2, (box[:, 2:] - box[:, :2]) / 2
            half = half * torch.exp(torch.randn(2, generator=g) * torch.tensor([0.15, 0.05]))  # stretch
            crop = crop_at(image, torch.cat([c - half, c + half], 1))
            if torch.rand(1, generator=g) < 0.3:  # a lower-resolution photo
                crop = F.interpolate(F.interpolate(crop, scale_factor=0.5, mode="area"), size=(HEIGHT, WIDTH),
                                     mode="bilinear", align_corners=False)
            crops.append(crop)
        texts.append(text)
    return torch.cat(crops), texts


@torch.inference_mode()
def self_labels(detector: str, folder: Path, min_confidence: float, skip: set[str] = frozenset(),
                limit: int | None = None, quiet: bool = False, reader: str = DEFAULT_READER,
                threshold: float | None = None) -> list[Sample]:
    """Photos of ``folder`` (``unlabeled/``, but those named in ``skip``) labelled with the numbers
    ``detector`` (with the digit ``reader``, without the number readers: they are what is being
    trained) reads with at least ``min_confidence``, at ``threshold`` (default: the one calibrated for
    its full pipeline, as the shipped reader was trained)."""
    if threshold is None:
        threshold = threshold_for(PipelineConfig((detector,)))
    pipe = Pipeline(PipelineConfig((detector,), digit_reader=reader, number_reader=None, precision="fp32",
                                   threshold=threshold, locator=None))  # crops, read whole
    out = []
    paths = [p for p in sorted(folder.glob("*.png")) if p.name not in skip][:limit]
    for path in tqdm(paths, desc=f"self-labelling with {detector}", unit="img", disable=quiet):
        image = to_tensor(load_image(path))
        number = read(pipe.detect_tensors([image])[0], threshold)
        if number.text and number.confidence >= min_confidence:
            d = number.digits
            out.append(((image * 255).round().to(torch.uint8), torch.from_numpy(d.boxes), torch.from_numpy(d.digits)))
    return out


@torch.inference_mode()
def accuracy(model: NumberReader, crops: torch.Tensor, texts: list[str]) -> float:
    """Share of crops read exactly."""
    model.eval()
    read = [t for i in range(0, len(crops), 256) for t in greedy_text(model(crops[i : i + 256]))]
    return sum(a == b for a, b in zip(read, texts)) / max(len(texts), 1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.number_reader", description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--backbone", choices=BACKBONES, default="crnn",
                   help="crnn: a small CNN of its own; reader: the digit reader's convolutional blocks")
    p.add_argument("--init-reader", metavar="READER",
                   help="start a 'reader' backbone from this digit reader's weights (name or path)")
    p.add_argument("--self-train", metavar="DETECTOR",
                   help="also train on the unlabeled/ photos whose number this detector (with the digit reader) reads "
                        "with at least --min-confidence")
    p.add_argument("--min-confidence", type=float, default=0.7)
    p.add_argument("--self-reader", default=DEFAULT_READER, help="the digit reader --self-train reads with (name or path)")
    p.add_argument("--self-threshold", type=float,
                   help="the score threshold --self-train reads at (default: the shipped calibration's for its pipeline)")
    add_run_args(p, DEFAULT_NUMBER_READER)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    g, samples, data_info = begin_run(args)
    if args.self_train:
        labelled = {im["file_name"] for extra in args.extra_json for im in load_coco(extra)["images"]}
        more = self_labels(args.self_train, args.data / args.extra_images, args.min_confidence, labelled, args.limit,
                           args.quiet, args.self_reader, args.self_threshold)
        data_info["self_labelled"] = {"detector": args.self_train, "images": args.extra_images, "count": len(more),
                                      "min_confidence": args.min_confidence}
        samples += more
    val_crops, val_texts = make_crops(load_samples(args.data / args.val_images, args.data / args.val_json), None)
    print(f"{len(samples)} training images, {len(val_texts)} validation numbers", file=sys.stderr)
    model = NumberReader(args.width, args.hidden, args.backbone)
    if args.init_reader:
        model.init_from_reader(load_reader(args.init_reader))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * math.ceil(len(samples) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps + args.epochs, pct_start=0.15)
    best, start, history, first = None, time.time(), [], 0
    run_state = RunState(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    extras = run_state.load(model, opt, sched, g)
    if extras:
        best, history, first = extras["best"], extras["history"], extras["epoch"]
        start -= extras["seconds"]
    for epoch in range(first, args.epochs):
        crops, texts = make_crops(samples, g)
        model.train()
        order = torch.randperm(len(crops), generator=g).tolist()
        bar = tqdm(range(0, len(crops), args.batch_size), desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                   disable=args.quiet)
        for i in bar:
            idx = order[i : i + args.batch_size]
            loss = ctc_nll(model(augment(crops[idx], g)).transpose(0, 1), [texts[k] for k in idx], zero_infinity=True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "number_accuracy": accuracy(model, val_crops, val_texts),
                        "loss": loss.item(), "seconds": round(time.time() - start)})
        print(f"epoch {epoch + 1}: valid number accuracy {history[-1]['number_accuracy']:.4f}, "
              f"last loss {history[-1]['loss']:.3f}, {history[-1]['seconds']} s", file=sys.stderr)
        if best is None or history[-1]["number_accuracy"] >= best["number_accuracy"]:
            best = history[-1]
            save_number_reader(model, args.out, {
                "training": {"epochs_run": epoch + 1, "train_seconds": round(time.time() - start), "device": "cpu",
                             "numbers_per_epoch": len(crops)},
                "recipe": sidecar_recipe(args),
                "data": data_info,
                "metrics": {"valid_number_accuracy_true_boxes": best["number_accuracy"]},
                "history": history,
            })
        run_state.save(model, opt, sched, g, epoch=epoch + 1, best=best, history=history, seconds=time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
