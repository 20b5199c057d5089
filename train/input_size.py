"""Pick a checkpoint's inference input size on a split (``valid`` by default) and record it in its sidecar.

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
from digit_demo.evaluation import rank
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


def tune_input_size(checkpoint: str | Path, sizes: list[int], data: Path = DEFAULT_DATA, val_json: str | Path = "valid.json",
                    val_images: str = "valid", reader: str | None = DEFAULT_READER) -> dict:
    """Sweep ``sizes`` for ``checkpoint`` on ``data/val_json`` (images in ``data/val_images``), record
    the best in its sidecar (with every size's result and the split that chose) and return it."""
    model, meta = load_checkpoint(checkpoint)
    gt = load_coco(data / val_json)
    loader = torch.utils.data.DataLoader(DigitDataset(data / val_images, data / val_json, eval_transforms()),
                                         batch_size=8, collate_fn=collate)
    digit_reader = optional_reader(reader, "fp32")  # as the shipped sizes were chosen
    results = size_sweep(model, loader, gt, sizes, digit_reader)
    top = max(results, key=rank)
    set_test_size(model, top["size"], top["max_size"])
    side = Path(meta["path"]).with_suffix(".json")
    sidecar = json.loads(side.read_text())
    sidecar["config"] = model.digit_config.to_dict()
    sidecar["input_size"].update(test_size=top["size"], test_max_size=top["max_size"], chosen_on=str(val_json))
    sidecar["input_size_sweep"] = [{k: r[k] for k in ("size", "max_size", "threshold", "mAP", "AP50", "accuracy")}
                                   for r in results]
    side.write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"{side}: inference short side {top['size']} (accuracy {top['accuracy']:.4f}, mAP {top['mAP']:.4f} "
          f"on {val_json})", file=sys.stderr)
    return top


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="resnet18_fpn", help="name or path of the checkpoint to tune")
    p.add_argument("--sizes", type=int, nargs="+", required=True, help="inference short sides to try")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--val-json", default="valid.json", help="the split that chooses (the reproduction's: its tuning split)")
    p.add_argument("--val-images", default="valid")
    p.add_argument("--threads", type=int)
    p.add_argument("--reader", default=DEFAULT_READER, help="second-stage digit reader to measure with")
    p.add_argument("--no-reader", dest="reader", action="store_const", const=None, help="measure the detector alone")
    args = p.parse_args(argv)
    set_threads(args.threads)
    tune_input_size(args.checkpoint, args.sizes, args.data, args.val_json, args.val_images, args.reader)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
