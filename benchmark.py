"""Benchmark every shipped checkpoint and their ensembles on the 300 SVHN `valid` images (CPU).

Per model: p50/p95 latency per image (batch 1, from the decoded photo to the number read at the
model's threshold; every reading of an image timed in the same moment, and the fastest of ``--repeats``
passes over the images kept, as this shared host's speed varies by tens of percent), images/s in batches of 8, peak RSS, mAP / AP50 / whole-number accuracy at the best validation threshold, and the server-side cost of one slider
update in the app; each model with the second-stage digit and whole-number readers (as the app and
CLI run it), marked "(no proposer)" without the number reader's proposer, "(no number reader)" with
the digit reader alone, and "(detector only)" without either; all in the default inference precision
(bfloat16 where the CPU has AMX), and marked "(fp32)" the same reading in float32 where that differs. Writes ``checkpoints/benchmark.json``, ``checkpoints/sweeps.json`` (threshold
curves the app's explorer shows), a ``benchmark`` entry in each sidecar (whose validation metrics
and threshold are re-measured on the shipped weights), and prints a Markdown table.

    python benchmark.py [--models a b c] [--threads 2] [--limit N] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from itertools import combinations, product
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
# each model's variants besides its own reading (with the digit reader, at one size): the child's keys
# for their latency and detections, the sidecar's ``valid_<name>``, and their ensemble_key marks
VARIANTS = {"detector_only": {"reader": False}, "multi_scale": {"multi_scale": True},
            "no_number_reader": {"number_reader": False}, "no_proposer": {"proposer": False}, "fp32": {"fp32": True}}
DATA = ROOT.parent / "shared" / "data" / "svhn"


def measure(name: str, threads: int, limit: int | None, out: Path, repeats: int) -> None:
    """Runs in a child process so that peak memory is the model's own."""
    import torch

    from digit_demo.assemble import assemble
    from digit_demo.data import load_coco
    from digit_demo.detect import Detector, set_threads, to_tensor
    from digit_demo.ensemble import member_threshold
    from digit_demo.images import load_image
    from digit_demo.models import inference_precision
    from digit_demo.reader import optional_reader, refine
    from digit_demo.sequence import optional_number_reader, read_line
    from digit_demo.session import Item, Session, write_downloads

    set_threads(threads)
    gt = load_coco(DATA / "valid.json")
    images = gt["images"][:limit] if limit else gt["images"]
    det = Detector.load(name, batch_size=8, reader=None, number_reader=None)
    threshold = member_threshold(det.meta) or 0.5
    reader = optional_reader()
    lines = optional_number_reader() if reader else None
    solo = optional_number_reader(proposer=None) if lines and lines.proposer else None  # the reader alone
    precision = inference_precision()
    # the full reading in float32, where the default precision is another (its weights count in peak RSS)
    exact = Detector.load(name, precision="fp32") if precision != "fp32" else None
    tensors = [to_tensor(load_image(DATA / "valid" / im["file_name"])) for im in images]
    det.detect_tensors(tensors[:4])  # warm-up

    def clock(step, *args):
        start = time.perf_counter()
        return step(*args), (time.perf_counter() - start) * 1000

    def number_ms(found) -> float:  # reading the number from fresh detections (nothing cached on them yet)
        return clock(assemble, found, threshold)[1]

    both = Detector(det.model, det.meta, reader=reader, multi_scale=True, number_reader=lines) if reader else None
    passes = []  # per pass over the images, each reading's latency per image (ms)
    for _ in range(repeats):  # every reading of an image is timed in the same moment as the others
        lat = {k: [] for k in ("full", "line", "detector_only", "no_number_reader", "no_proposer", "multi_scale", "fp32")}
        raw, plain, no_lines, no_proposer, multi, fp32 = {}, {}, {}, {}, {}, {}
        for im, t in zip(images, tensors):
            i = im["id"]
            plain[i], ms_det = clock(lambda x: det.detect_tensors([x])[0], t)
            lat["detector_only"].append(ms_det + number_ms(plain[i]))
            no_lines[i], ms_refine = clock(refine, reader, t, plain[i]) if reader else (plain[i], 0.0)
            raw[i], ms_line = clock(read_line, lines, t, no_lines[i]) if lines else (no_lines[i], 0.0)
            lat["line"].append(ms_line)
            lat["full"].append(ms_det + ms_refine + ms_line + number_ms(raw[i]))
            lat["no_number_reader"].append(ms_det + ms_refine + number_ms(no_lines[i]))
            if solo:
                no_proposer[i], ms_solo = clock(read_line, solo, t, no_lines[i])
                lat["no_proposer"].append(ms_det + ms_refine + ms_solo + number_ms(no_proposer[i]))
            if both:  # also read at two input sizes (--multi-scale)
                multi[i], ms_multi = clock(lambda x: both.detect_tensors([x])[0], t)
                lat["multi_scale"].append(ms_multi + number_ms(multi[i]))
            if exact:
                fp32[i], ms_exact = clock(lambda x: exact.detect_tensors([x])[0], t)
                lat["fp32"].append(ms_exact + number_ms(fp32[i]))
        passes.append(lat)

    def timing(key: str) -> dict | None:
        """p50 and p95 over the images: the lowest of the passes (the one the host slowed least)."""
        if not passes[0][key]:
            return None
        return {f"p{q}_ms": min(float(np.percentile(p[key], q)) for p in passes) for q in (50, 95)}

    det.reader, det.number_reader = reader, lines
    start = time.perf_counter()
    det.detect_tensors(tensors)
    batch_ips = len(tensors) / (time.perf_counter() - start)
    # one slider update for one image, as the app does it: re-assemble, draw, write the downloads
    first = images[0]
    session = Session(items=[Item(first["file_name"], first["id"], load_image(DATA / "valid" / first["file_name"]), raw[first["id"]])])
    slider = []
    for t in np.linspace(0.1, 0.9, 20):
        start = time.perf_counter()
        write_downloads(session.render(float(t)), float(t))
        slider.append((time.perf_counter() - start) * 1000)
    def as_json(found):
        return {k: {"boxes": v.boxes.tolist(), "scores": v.scores.tolist(), "digits": v.digits.tolist(),
                    "line": None if v.line is None else v.line.tolist(),
                    "proposal": None if v.proposal is None else as_json({0: v.proposal})[0]} for k, v in found.items()}

    out.write_text(json.dumps({
        **timing("full"), "p50_ms_per_pass": [float(np.percentile(p["full"], 50)) for p in passes],
        "batch_images_per_s": batch_ips,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "slider_update_ms": float(np.median(slider)),
        "threads": threads, "precision": precision, "torch": torch.__version__, "reader": reader.meta["name"] if reader else None,
        "number_reader": lines.meta["name"] if lines else None,
        "proposer": lines.proposer.meta["name"] if lines and lines.proposer else None,
        "line_p50_ms": timing("line")["p50_ms"],
        **{variant: timing(variant) for variant in VARIANTS},
        "detections": as_json(raw), "detections_detector_only": as_json(plain), "detections_multi_scale": as_json(multi),
        "detections_no_number_reader": as_json(no_lines if lines else {}),
        "detections_no_proposer": as_json(no_proposer), "detections_fp32": as_json(fp32),
    }))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--repeats", type=int, default=3,
                    help="passes over the images; latency is the fastest pass's (this shared host's speed varies)")
    ap.add_argument("--readme", action="store_true", help="also put the table into README.md")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        measure(args._child[0], args.threads, args.limit, Path(args._child[1]), args.repeats)
        return 0

    from digit_demo.assemble import Detections
    from digit_demo.card import training_summary, write_model_card
    from digit_demo.checkpoints import CHECKPOINT_DIR, available
    from digit_demo.data import load_coco
    from digit_demo.ensemble import FUSIONS, ensemble_key, member_weights
    from digit_demo.detect import fuse_members, to_tensor
    from digit_demo.evaluation import best, sweep
    from digit_demo.images import load_image
    from digit_demo.sequence import optional_number_reader

    def parse(found: dict) -> dict:
        return {int(k): Detections(np.array(v["boxes"], np.float32).reshape(-1, 4), np.array(v["scores"], np.float32),
                                   np.array(v["digits"], np.int64),
                                   None if v.get("line") is None else np.array(v["line"], np.float32),
                                   None if v.get("proposal") is None else parse({0: v["proposal"]})[0])
                for k, v in found.items()}

    names = args.models or available()
    gt = load_coco(DATA / "valid.json")
    lines = optional_number_reader()  # ensembles read their fused digits' line, as the app and CLI do
    tensors = {im["id"]: to_tensor(load_image(DATA / "valid" / im["file_name"])) for im in gt["images"]} if lines else {}
    if args.limit:
        gt = {**gt, "images": gt["images"][: args.limit]}
        keep = {im["id"] for im in gt["images"]}
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    results, raw, raw_multi, curves, groups = {}, {}, {}, {}, {}
    for name in names:
        tmp = ROOT / "out" / f"bench_{name}.json"
        tmp.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats), "--_child", name, str(tmp)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        subprocess.run(cmd, check=True)
        r = json.loads(tmp.read_text())
        raw[name] = parse(r.pop("detections"))
        curves[name] = sweep(gt, raw[name])
        found = {variant: parse(r.pop(f"detections_{variant}")) for variant in VARIANTS}
        raw_multi[name] = found["multi_scale"]
        results[name] = r
        if r["reader"]:  # the same detector without the readers, and read at two sizes, for comparison
            for variant, marks in VARIANTS.items():
                if not found[variant]:
                    continue
                key = ensemble_key([name], "", **marks)
                curves[key] = sweep(gt, found[variant])
                results[key] = {**r, **r[variant], "batch_images_per_s": None, "peak_rss_mb": None}
    for k in range(2, len(names) + 1):
        for group in combinations(names, k):
            for method, multi_scale in product(FUSIONS, (False, True) if raw_multi[group[0]] else (False,)):
                key = ensemble_key(group, method, multi_scale=multi_scale)
                members = [ensemble_key([g], "", multi_scale=multi_scale) for g in group]
                found = raw_multi if multi_scale else raw
                groups[key] = members
                ids = sorted(found[group[0]])
                start = time.perf_counter()
                # the accuracies measured here are what the sidecars will hold, so the app fuses alike
                tops = [best(curves[g]) for g in group]
                weights = member_weights([{"metrics": {"valid": {"accuracy": t.accuracy}}} for t in tops])
                thresholds = [best(curves[m]).threshold for m in members]  # at two sizes where run so
                per_member = [[found[g][i] for i in ids] for g in group]
                fused = dict(zip(ids, fuse_members([tensors.get(i) for i in ids], per_member, method, 0.55, weights,
                                                   thresholds, lines)))
                fuse_ms = (time.perf_counter() - start) * 1000 / len(ids)
                curves[key] = sweep(gt, fused)
                # an ensemble reads the fused line (timed above) and each member's own line, which the
                # members' detections here carry already (in their p50; fuse_members does not read them again)
                results[key] = {"p50_ms": sum(results[m]["p50_ms"] for m in members) + fuse_ms,
                                "p95_ms": sum(results[m]["p95_ms"] for m in members) + fuse_ms,
                                "batch_images_per_s": None if multi_scale else
                                1 / sum(1 / results[g]["batch_images_per_s"] for g in group),
                                "peak_rss_mb": None, "slider_update_ms": results[group[0]]["slider_update_ms"]}
    for key, rows in curves.items():
        b = best(rows)
        results[key].update({"threshold": b.threshold, "mAP": b.mAP, "AP50": b.AP50, "AP75": b.AP75, "accuracy": b.accuracy})
        if key in groups:
            members = groups[key]
            top = max(members, key=lambda m: results[m]["accuracy"])
            results[key]["beats_best_member"] = {"accuracy": b.accuracy >= results[top]["accuracy"],
                                                 "mAP": b.mAP >= max(results[m]["mAP"] for m in members)}
    (CHECKPOINT_DIR / "sweeps.json").write_text(json.dumps({k: [r.__dict__ for r in v] for k, v in curves.items()}, indent=1))
    (CHECKPOINT_DIR / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    train_speed = {}
    for name in names:
        side = CHECKPOINT_DIR / f"{name}.json"
        meta = json.loads(side.read_text())
        train_speed[name] = training_summary(meta)
        meta["benchmark"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in results[name].items()}
        # re-measured on the shipped (fp16) weights with the current number assembly
        meta["metrics"]["valid"] = {**best(curves[name]).__dict__, "measured_by": "benchmark.py",
                                    "epoch": meta["metrics"]["valid"].get("epoch"), "reader": results[name]["reader"]}
        for variant, marks in VARIANTS.items():
            key = ensemble_key([name], "", **marks)
            if key in curves:
                meta["metrics"][f"valid_{variant}"] = dict(best(curves[key]).__dict__)
        meta["threshold"] = meta["metrics"]["valid"]["threshold"]
        meta["sweep"] = [r.__dict__ for r in curves[name]]
        side.write_text(json.dumps(meta, indent=2) + "\n")
    write_model_card()
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {len(gt['images'])} `valid` images, {args.threads} CPU threads "
             f"(this 2-core machine), torch {results[names[0]]['torch']}; latency is per image at batch 1, from the "
             f"decoded photo to the number read, in the fastest of {args.repeats} passes over the images, "
             "ensembles add up their members; accuracy and mAP at each row's best threshold. Every model runs with "
             f"the second-stage digit reader (`{results[names[0]]['reader']}`) and whole-number reader "
             f"(`{results[names[0]]['number_reader']}`, with its proposer `{results[names[0]]['proposer']}`) except "
             "the rows marked (detector only), without the number reader in the rows marked (no number reader), "
             "and without its proposer in the rows marked (no proposer). Inference runs in "
             f"{results[names[0]]['precision']} (`DIGIT_DEMO_PRECISION=auto`: bf16 where the CPU has AMX, as this one) "
             "except the rows marked (fp32); peak RSS counts the float32 copy measured alongside.", ""]
    lines += ["| model | threshold | mAP | AP50 | accuracy | p50 ms | p95 ms | batch img/s | peak RSS MB | slider ms | training (per device: epochs, time, img/s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"
        ips = f"{r['batch_images_per_s']:.1f}" if r.get("batch_images_per_s") else "-"
        train_ips = train_speed.get(key, "-")
        lines.append(f"| {key} | {r['threshold']:.2f} | {r['mAP']:.3f} | {r['AP50']:.3f} | {r['accuracy']:.3f} | {r['p50_ms']:.0f} "
                     f"| {r['p95_ms']:.0f} | {ips} | {rss} | {r['slider_update_ms']:.1f} | {train_ips} |")
    verdicts = [f"`{k}`: accuracy {'not below' if r['beats_best_member']['accuracy'] else 'BELOW'}, mAP "
                f"{'not below' if r['beats_best_member']['mAP'] else 'below'} its best member"
                for k, r in results.items() if "beats_best_member" in r]
    if verdicts:
        lines += ["", "Ensembles against their best member: " + "; ".join(verdicts) + "."]
    table = "\n".join(lines)
    print(table)
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        start, end = text.index("<!-- benchmark:start -->"), text.index("<!-- benchmark:end -->")
        readme.write_text(text[: start + len("<!-- benchmark:start -->")] + "\n" + table + "\n" + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
