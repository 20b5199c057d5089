"""Collect the trained checkpoints into one folder and choose their constants on the tuning split.

The reproduction's ``tune`` stage. It copies each detector and second-stage reader from its stage's
folder into ``--out`` under its shipped name, then, on ``--split`` (the tuning split carved from
``train``; never ``valid``), picks in turn:

1. each detector's inference short side (:func:`train.input_size.tune_input_size`), among its
   trained size plus ``--size-steps``;
2. the digit reader's ``box_blend`` (how far a box moves to where the reader sees the digit), read
   through the default pipeline;
3. the number reader's ``region_threshold`` and ``line_margin`` (re-reading the same detections).

Each is chosen by whole-number accuracy at the best threshold of a sweep (then mAP), ties going to
the earlier candidate, and written into the sidecar's ``tuned`` block with ``chosen_on``.

    python -m train.tune --split runs/splits/tune.json --detectors runs/a/a.safetensors ... --out runs/tune/checkpoints
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
import shutil
import sys
from pathlib import Path

from digit_demo.checkpoints import read_sidecar
from digit_demo.data import load_coco
from digit_demo.detect import set_threads, to_tensor
from digit_demo.evaluation import best, rank, sweep
from digit_demo.images import load_image

from .cli import DEFAULT_DATA
from .input_size import tune_input_size


def copy_checkpoint(src: Path, out: Path, name: str) -> Path:
    src = Path(src).with_suffix(".safetensors")
    out.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(src.with_suffix(suffix), out / f"{name}{suffix}")
    side = out / f"{name}.json"
    meta = json.loads(side.read_text())
    meta["name"] = name
    side.write_text(json.dumps(meta, indent=2) + "\n")
    return out / f"{name}.safetensors"


def _score(rows) -> tuple[float, float]:
    """A setting's accuracy and mAP at its best threshold (:func:`digit_demo.evaluation.rank`)."""
    return rank(best(rows))[:2]


def _record(path: Path, chosen: dict, rows: list[dict], split: str) -> None:
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta.setdefault("tuned", {}).update(chosen, chosen_on=f"tuning split ({split})")
    meta.setdefault("tuning", {})[" + ".join(chosen)] = rows
    side.write_text(json.dumps(meta, indent=2) + "\n")


def tune_readers(out: Path, detector: str, gt: dict, images: Path, blends: list[float], regions: list[float],
                 margins: list[float], split: str) -> dict:
    """Choose the digit reader's box blend, then the number reader's region threshold and line margin,
    by what the pipeline of ``detector`` (with the readers in ``out``) reads on ``gt``'s images."""
    from digit_demo.pipeline import Pipeline, PipelineConfig, read_number_line
    from digit_demo.number_reader import LineSettings
    from digit_demo.types import Found

    reader, number = out / "digit_reader.safetensors", out / "number_reader.safetensors"
    proposer = out / "number_proposer.safetensors"
    config = PipelineConfig((str(out / f"{detector}.safetensors"),), digit_reader=str(reader), number_reader=str(number),
                            proposer=str(proposer) if proposer.is_file() else None, precision="fp32", threshold=0.5,
                            locator=None)  # crops, read whole
    pipe = Pipeline(config)
    tensors = {im["id"]: to_tensor(load_image(images / im["file_name"])) for im in gt["images"]}
    ids = list(tensors)
    chosen, rows = {}, {"box_blend": [], "line": []}
    member = pipe.members[0]
    best_key, found = None, None
    for blend in blends:
        member.reader.settings = replace(member.reader.settings, box_blend=blend)
        dets = member.detect_tensors([tensors[i] for i in ids])
        key = _score(sweep(gt, dict(zip(ids, pipe.with_lines([tensors[i] for i in ids], [Found(d) for d in dets])))))
        rows["box_blend"].append({"box_blend": blend, "accuracy": key[0], "mAP": key[1]})
        print(json.dumps(rows["box_blend"][-1]), file=sys.stderr)
        if best_key is None or key > best_key:
            best_key, found, chosen["box_blend"] = key, dets, blend
    member.reader.settings = replace(member.reader.settings, box_blend=chosen["box_blend"])
    _record(reader, {"box_blend": chosen["box_blend"]}, rows["box_blend"], split)
    best_key = None
    model = pipe.number_reader
    for region in regions:
        for margin in margins:
            model.settings = LineSettings(region, margin)
            lined = [Found(d, read_number_line(model, tensors[i], d)) for i, d in zip(ids, found)]
            key = _score(sweep(gt, dict(zip(ids, lined))))
            rows["line"].append({"region_threshold": region, "line_margin": margin, "accuracy": key[0], "mAP": key[1]})
            print(json.dumps(rows["line"][-1]), file=sys.stderr)
            if best_key is None or key > best_key:
                best_key, chosen["region_threshold"], chosen["line_margin"] = key, region, margin
    for path in (number, proposer):
        if path.is_file():
            _record(path, {"region_threshold": chosen["region_threshold"], "line_margin": chosen["line_margin"]},
                    rows["line"], split)
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--split", type=Path, required=True, help="the tuning split's COCO json")
    p.add_argument("--images", default="train", help="its image folder inside --data")
    p.add_argument("--detectors", type=Path, nargs="+", required=True, help="detector checkpoints (their names are kept)")
    p.add_argument("--digit-reader", type=Path, required=True)
    p.add_argument("--number-reader", type=Path, required=True)
    p.add_argument("--proposer", type=Path)
    p.add_argument("--default", default="resnet18_fpn", help="the detector whose pipeline chooses the readers' constants")
    p.add_argument("--size-steps", type=int, nargs="+", default=[-8, 0, 8, 16], help="short sides tried: trained + these")
    p.add_argument("--box-blend", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--region-threshold", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    p.add_argument("--line-margin", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.out.exists():
        shutil.rmtree(args.out)
    split = str(args.split)
    reader = copy_checkpoint(args.digit_reader, args.out, "digit_reader")
    copy_checkpoint(args.number_reader, args.out, "number_reader")
    if args.proposer:
        copy_checkpoint(args.proposer, args.out, "number_proposer")
    names = []
    for det in args.detectors:
        name = read_sidecar(det.with_suffix(".safetensors"))["name"]
        path = copy_checkpoint(det, args.out, name)
        names.append(name)
        cfg = read_sidecar(path)["config"]
        trained = cfg.get("test_size") or (cfg["min_size"][-1] if isinstance(cfg["min_size"], list) else cfg["min_size"])
        sizes = sorted({max(32, int(trained) + step) for step in args.size_steps})
        tune_input_size(path, sizes, args.data, args.split, args.images, str(reader))
    if args.default not in names:
        raise SystemExit(f"--default {args.default} is not among the detectors ({', '.join(names)})")
    chosen = tune_readers(args.out, args.default, load_coco(args.split), args.data / args.images, args.box_blend,
                          args.region_threshold, args.line_margin, split)
    print(json.dumps(chosen), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
