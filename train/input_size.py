"""Pick a checkpoint's inference input size on ``valid`` and record it in its sidecar.

Models here train on small multi-scale inputs (e.g. short sides 80-112) and torchvision infers at
the last training size; reading a little larger can be better, and with the second-stage digit reader
(used unless ``--no-reader``) a smaller, faster input may read as well. Each candidate short side
(long-side cap scaled alike) gets a full threshold sweep; the best whole-number accuracy (then mAP)
wins. The sidecar keeps the chosen size and every size's result (its threshold and metrics are the
release step's to write: benchmark.py, then python -m digit_demo release); the weights are untouched.

    python -m train.input_size --checkpoint resnet18_fpn --sizes 96 112 120 128 136
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from digit_demo.checkpoints import load_checkpoint
from digit_demo.data import DigitDataset, collate, load_coco
from digit_demo.detect import set_threads
from digit_demo.models import set_test_size
from digit_demo.reader import DEFAULT_READER, DigitReader, optional_reader

from . import engine
from .cli import DEFAULT_DATA
from .presets import eval_transforms


def size_sweep(model, loader, gt: dict, sizes: list[int], reader: DigitReader | None = None) -> list[dict]:
    """Best validation row per inference short side (the long-side cap scales with it)."""
    cfg = model.digit_config
    out = []
    for size in sizes:
        max_size = cfg.max_size_for(size)
        set_test_size(model, size, max_size)
        top, rows = engine.evaluate(model, loader, gt, torch.device("cpu"), reader)
        out.append({"size": size, "max_size": max_size, **top.__dict__, "sweep": [r.__dict__ for r in rows]})
        print(json.dumps({k: v for k, v in out[-1].items() if k != "sweep"}), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="resnet18_fpn", help="name or path of the checkpoint to tune")
    p.add_argument("--sizes", type=int, nargs="+", required=True, help="inference short sides to try")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--threads", type=int)
    p.add_argument("--reader", default=DEFAULT_READER, help="second-stage digit reader to measure with")
    p.add_argument("--no-reader", dest="reader", action="store_const", const=None, help="measure the detector alone")
    args = p.parse_args(argv)
    set_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    gt = load_coco(args.data / "valid.json")
    loader = torch.utils.data.DataLoader(DigitDataset(args.data / "valid", args.data / "valid.json", eval_transforms()),
                                         batch_size=8, collate_fn=collate)
    reader = optional_reader(args.reader, "fp32")  # as the shipped sizes were chosen
    results = size_sweep(model, loader, gt, args.sizes, reader)
    top = max(results, key=lambda r: (round(r["accuracy"], 4), round(r["mAP"], 4)))
    set_test_size(model, top["size"], top["max_size"])
    side = Path(meta["path"]).with_suffix(".json")
    sidecar = json.loads(side.read_text())
    sidecar["config"] = model.digit_config.to_dict()
    sidecar["input_size"].update(test_size=top["size"], test_max_size=top["max_size"])
    sidecar["input_size_sweep"] = [{k: r[k] for k in ("size", "max_size", "threshold", "mAP", "AP50", "accuracy")}
                                   for r in results]
    side.write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"{side}: inference short side {top['size']} (accuracy {top['accuracy']:.4f}, mAP {top['mAP']:.4f})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
