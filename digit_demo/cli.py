"""``python -m digit_demo``: predict, evaluate, sweep thresholds, list models."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoints import CHECKPOINT_DIR, DEFAULT_MODEL, CheckpointError
from .ensemble import DEFAULT_FUSION, FUSIONS
from .images import ImageError
from .inference import PRECISION_ENV, PRECISIONS
from .reader import DEFAULT_READER
from .locator import DEFAULT_LOCATOR
from .pipeline import default_locator
from .number_reader import DEFAULT_PROPOSER, DEFAULT_NUMBER_READER


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", action="append", help=f"checkpoint name or path; repeat for an ensemble (default {DEFAULT_MODEL})")
    p.add_argument("--fusion", choices=FUSIONS, default=DEFAULT_FUSION, help="how an ensemble merges boxes")
    p.add_argument("--fusion-iou", type=float, default=0.55)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="CPU threads for inference (default $DIGIT_DEMO_THREADS, else torch's)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help=f"inference precision (default ${PRECISION_ENV} or auto: bf16 where the CPU has AMX, "
                        "about 1.4x faster at the same accuracy on valid; fp32 elsewhere)")
    p.add_argument("--reader", default=DEFAULT_READER, help=f"second-stage digit reader checkpoint (default {DEFAULT_READER})")
    p.add_argument("--no-reader", dest="reader", action="store_const", const=None, help="use the detector's own digit scores")
    p.add_argument("--number-reader", default=DEFAULT_NUMBER_READER,
                   help=f"whole-number reader checkpoint that settles how many digits a number has (default {DEFAULT_NUMBER_READER})")
    p.add_argument("--no-number-reader", dest="number_reader", action="store_const", const=None,
                   help="read the number from the digits above the threshold alone")
    p.add_argument("--proposer", default=DEFAULT_PROPOSER,
                   help=f"second whole-number reader whose reading joins the alternatives (default {DEFAULT_PROPOSER})")
    p.add_argument("--no-proposer", dest="proposer", action="store_const", const=None,
                   help="judge only the numbers the detections allow (it is asked where the readings disagree: 1-2 ms at the median)")
    p.add_argument("--locator", default=default_locator(),
                   help=f"what finds the numbers in a photo: 'ppocr' (default where installed: PP-OCR's text lines that "
                        f"hold digits, where the readers are not sure of a number filling the photo), or a locator "
                        f"checkpoint ({DEFAULT_LOCATOR}: the CNN locator, faster, far weaker on real photos)")
    p.add_argument("--no-locator", dest="locator", action="store_const", const=None,
                   help="read every photo whole, as a crop")
    p.add_argument("--multi-scale", action="store_true",
                   help="also read each image at a larger input size and merge (more digits found, ~2x slower)")


def _config(args):
    """The :class:`digit_demo.pipeline.PipelineConfig` the command's options describe."""
    from .pipeline import PipelineConfig

    return PipelineConfig(tuple(args.model or [DEFAULT_MODEL]), args.fusion, args.fusion_iou, args.reader,
                          args.number_reader, args.proposer, args.multi_scale, args.precision,
                          getattr(args, "threshold", None), args.batch_size, args.locator)


def _pipeline(args):
    from .detect import set_threads
    from .pipeline import Pipeline

    set_threads(args.threads)
    return Pipeline(_config(args))


def cmd_predict(args) -> int:
    from tqdm import tqdm

    from .images import expand_paths
    from .session import Picture, draw_number, draw_overview
    from .io import image_id_for, write_pred_csv, write_pred_json

    paths = expand_paths(args.paths)
    if not paths:
        raise FileNotFoundError("no images found in " + " ".join(args.paths))
    pipe = _pipeline(args)
    threshold = pipe.threshold
    args.out.mkdir(parents=True, exist_ok=True)
    if args.annotate:
        (args.out / "annotated").mkdir(exist_ok=True)
    kept, labels, lines, read = {}, {}, [], 0
    regions = args.regions.open("w") if args.regions else None
    readings = pipe.read_iter(paths, [str(p) for p in paths], keep_images=args.annotate)
    for k, (p, reading) in enumerate(zip(paths, tqdm(readings, total=len(paths), unit="img", disable=args.quiet)), 1):
        image_id = image_id_for(p, k)
        if reading.error:
            tqdm.write(f"skipped {reading.error}", file=sys.stderr)
            labels[image_id] = -1
            lines.append(f"{p}\t-1\terror")
            continue
        read += 1
        number = reading.number(threshold)
        kept[image_id], labels[image_id] = reading.kept(threshold), number.label
        if regions:
            regions.write(json.dumps({"file": str(p), "image_id": image_id, "numbers": [
                {"text": n.text, "confidence": round(n.confidence, 4),
                 "region": None if g.whole else [round(float(v), 1) for v in g.box],
                 "region_score": None if g.whole else round(g.score, 4),
                 "digits": [{"digit": int(d), "score": round(float(sc), 4), "box": [round(float(v), 1) for v in b]}
                            for b, sc, d in zip(n.digits.boxes, n.digits.scores, n.digits.digits)]}
                for g, n in reading.numbers(threshold)]}) + "\n")
        lines.append(f"{p}\t{number.text or '-1'}\t{number.confidence:.3f}")
        picture = Picture.of(reading) if args.annotate else None
        drawn = draw_number(reading, threshold, picture) if picture else None
        if drawn:
            drawn[1].save(args.out / "annotated" / f"{p.stem}.png")
            overview = draw_overview(reading, threshold, picture)
            if overview is not None:  # a whole photo: also the photo with every number found marked
                overview.save(args.out / "annotated" / f"{p.stem}_photo.png")
    if regions:
        regions.close()
    write_pred_json(args.out / "pred.json", kept)
    write_pred_csv(args.out / "pred.csv", labels)
    if not args.quiet:
        print("\n".join(lines))
    print(f"wrote {args.out / 'pred.json'} and {args.out / 'pred.csv'} ({read} of {len(paths)} images read, "
          f"threshold {threshold:.2f}, {pipe.name})", file=sys.stderr)
    return 0 if read else 1


def _ground_truth(args):
    from .data import load_coco, subset

    gt = load_coco(args.gt)
    images = args.images or args.gt.parent / args.gt.stem
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: image folder not found (pass --images)")
    if args.limit:
        gt = subset(gt, [im["id"] for im in gt["images"][: args.limit]])
    return gt, images


def _readings_for_gt(args, pipe, gt, images) -> dict:
    """The readings of ``gt``'s images by every configuration measured: each member alone (at its own
    calibrated threshold) and, for an ensemble, the ensemble; by configuration key, then image id.
    Every image is read through :meth:`Pipeline.read_iter`, as ``predict`` reads it (locate stage,
    per-image errors included); members share a memo, so each runs once per image."""
    from dataclasses import replace

    from tqdm import tqdm

    from .pipeline import Pipeline

    memo: dict = {}
    pipes = [Pipeline(replace(pipe.config, models=(model,)), stages=replace(pipe.stages, members=[member]), memo=memo)
             for model, member in zip(pipe.config.models, pipe.members)]
    if len(pipes) > 1:
        pipes.append(Pipeline(pipe.config, stages=pipe.stages, memo=memo))
    ids = [im["id"] for im in gt["images"]]
    paths = [images / im["file_name"] for im in gt["images"]]
    found = {}
    for p in pipes:
        readings = tqdm(p.read_iter(paths), total=len(paths), unit="img", desc=p.name, disable=args.quiet)
        found[p.name] = (p, dict(zip(ids, readings)))
    return found


def cmd_evaluate(args) -> int:
    from .data import gt_numbers
    from .evaluation import coco_map, evaluate, number_accuracy
    from .io import read_pred_csv, read_pred_json

    if args.pred_json or args.pred_csv:  # score existing HW2 files
        from .data import load_coco

        gt = load_coco(args.gt)
        out = {}
        if args.pred_json:
            out.update(coco_map(gt, read_pred_json(args.pred_json)))
        if args.pred_csv:
            out["accuracy"] = number_accuracy(gt_numbers(gt), read_pred_csv(args.pred_csv))
        print(json.dumps({k: round(v, 4) for k, v in out.items()}))
        return 0
    gt, images = _ground_truth(args)
    for name, (p, readings) in _readings_for_gt(args, _pipeline(args), gt, images).items():
        row = evaluate(gt, readings, p.threshold)
        print(json.dumps({"model": name, **{k: round(v, 4) for k, v in row.__dict__.items()}}))
    return 0


def cmd_sweep(args) -> int:
    from .evaluation import best, plot_sweep, sweep, write_table
    from .release import judge_ensembles

    gt, images = _ground_truth(args)
    pipe = _pipeline(args)
    curves = {name: sweep(gt, readings) for name, (_, readings) in _readings_for_gt(args, pipe, gt, images).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, rows in curves.items():
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        write_table(rows, args.out / f"sweep_{safe}.csv")
        summary[name] = {k: round(v, 4) for k, v in best(rows).__dict__.items()}
    if len(pipe.members) > 1:
        summary[pipe.name]["members"] = [n for n in summary if n != pipe.name]
        judge_ensembles(summary)
    plot_sweep(curves, args.out / "sweep.png")
    (args.out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'sweep.png'} and tables in {args.out}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from .card import card_rows, reader_sidecar, write_model_card
    from .checkpoints import measured

    if args.write_card:
        print(f"wrote {write_model_card()}", file=sys.stderr)
    for meta in card_rows():
        v = measured(meta, "valid")
        line = {"name": meta["name"], "architecture": meta["architecture"], "threshold": meta.get("threshold"),
                "valid_mAP": round(v.get("mAP", 0), 4), "valid_accuracy": round(v.get("accuracy", 0), 4),
                "default": meta["name"] == DEFAULT_MODEL}
        print(json.dumps(line if not args.verbose else {k: x for k, x in meta.items() if k != "sweep"}))
    meta = reader_sidecar()
    if meta is not None:  # the second stage every detector uses unless --no-reader
        m = measured(meta)
        print(json.dumps({"name": meta["name"], "architecture": meta["architecture"], "role": "second-stage digit reader",
                          "valid_digit_accuracy": round(m.get("valid_digit_accuracy", 0), 4)}))
    roles = {DEFAULT_NUMBER_READER: "whole-number reader", DEFAULT_PROPOSER: "whole-number reader's proposer"}
    meta = reader_sidecar(name=DEFAULT_LOCATOR)
    if meta is not None:  # finds the numbers in whole photos unless --no-locator
        print(json.dumps({"name": meta["name"], "architecture": meta["architecture"], "role": "locator",
                          "tune_scenes": measured(meta, "tune_scenes") or None}))
    for name, role in roles.items():  # read the whole line unless --no-number-reader / --no-proposer
        meta = reader_sidecar(name=name)
        if meta is not None:
            print(json.dumps({"name": meta["name"], "architecture": meta["architecture"], "role": role,
                              "valid_number_accuracy_true_boxes": round(measured(meta)["valid_number_accuracy_true_boxes"], 4)}))
    return 0


def cmd_convert(args) -> int:
    from .data import digitstruct_to_coco

    coco = digitstruct_to_coco(args.mat, args.images)
    args.out.write_text(json.dumps(coco))
    print(f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} digit boxes", file=sys.stderr)
    return 0


def cmd_release(args) -> int:
    from .release import WorseThanShipped, release

    try:
        written = release(args.results, args.to, args.calibration, args.weights, args.stages,
                          args.gt, args.images)
    except (WorseThanShipped, RuntimeError) as err:
        print(f"digit_demo release: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_publish(args) -> int:
    from .publish import ROOT, publish, space_files

    files = space_files(ROOT)
    size = sum((ROOT / f).stat().st_size for f in files) / 2**20
    print(f"{len(files)} files, {size:.0f} MB: " + " ".join(files), file=sys.stderr)
    if args.dry_run:
        return 0
    print(publish(args.space, ROOT, private=args.private))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m digit_demo", description="Read house numbers in street photos.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("predict", help="images, folders or globs -> pred.json, pred.csv (and annotated images)")
    pr.add_argument("paths", nargs="+")
    pr.add_argument("--out", type=Path, default=Path("out"))
    pr.add_argument("-t", "--threshold", type=float, help="confidence threshold (default: the model's best on valid)")
    pr.add_argument("--annotate", action="store_true", help="also write annotated images to OUT/annotated/")
    pr.add_argument("--regions", type=Path, help="also write every number found (in a whole photo: each located "
                                                 "region) as JSON lines to this file")
    pr.add_argument("-q", "--quiet", action="store_true")
    _model_args(pr)
    pr.set_defaults(func=cmd_predict)

    for name, fn, helptext in (("evaluate", cmd_evaluate, "COCO ground truth -> mAP and whole-number accuracy"),
                               ("sweep", cmd_sweep, "metrics at every threshold -> table + plot")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--gt", type=Path, required=True, help="COCO ground-truth JSON (e.g. valid.json)")
        s.add_argument("--images", type=Path, help="image folder (default: next to the JSON, named like it)")
        s.add_argument("--limit", type=int, help="only the first N images")
        s.add_argument("-q", "--quiet", action="store_true")
        _model_args(s)
        if name == "evaluate":
            s.add_argument("-t", "--threshold", type=float)
            s.add_argument("--pred-json", type=Path, help="score this pred.json instead of running a model")
            s.add_argument("--pred-csv", type=Path, help="score this pred.csv instead of running a model")
        else:
            s.add_argument("--out", type=Path, default=Path("out/sweep"))
        s.set_defaults(func=fn)

    c = sub.add_parser("convert", help="SVHN format-1 digitStruct.mat -> COCO JSON (HW2 layout)")
    c.add_argument("mat", type=Path)
    c.add_argument("--images", type=Path, help="folder of the images (default: the .mat's folder)")
    c.add_argument("--out", type=Path, required=True)
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("models", help="list available checkpoints and their measured metrics")
    m.add_argument("--write-card", action="store_true", help="regenerate checkpoints/README.md")
    m.add_argument("-v", "--verbose", action="store_true")
    m.set_defaults(func=cmd_models)

    r = sub.add_parser("release", help="write benchmark.py's measurements into checkpoints/ (calibration, metrics, card)")
    r.add_argument("--results", type=Path, default=Path("out/benchmark"), help="benchmark.py's output folder")
    r.add_argument("--calibration", type=Path,
                   help="benchmark.py's output on the tuning split: thresholds are chosen there, --results only reports")
    r.add_argument("--weights", type=Path, help="copy the checkpoints in this folder into the release folder first")
    r.add_argument("--to", type=Path, default=CHECKPOINT_DIR, help="the release folder (default: checkpoints/)")
    r.add_argument("--stages", type=Path, help="the reproduction's record of its finished stages (runs/stages.json): "
                                               "each sidecar then names the stage that made it")
    r.add_argument("--gt", type=Path, help="with --weights: `valid`'s COCO json, to read it with what ships now and "
                                           "compare (else the figure its sidecar records)")
    r.add_argument("--images", type=Path, help="the images of --gt")
    r.set_defaults(func=cmd_release)

    u = sub.add_parser("publish", help="upload the app, library and checkpoints as a Hugging Face Space (online)")
    u.add_argument("space", help="the Space's repo id, e.g. your-name/house-numbers")
    u.add_argument("--private", action="store_true")
    u.add_argument("--dry-run", action="store_true", help="list what would be uploaded and stop")
    u.set_defaults(func=cmd_publish)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ImageError, FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
