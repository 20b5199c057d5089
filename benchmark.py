"""Benchmark every shipped checkpoint and their ensembles on the 300 SVHN `valid` images (CPU).

Each row is one :class:`digit_demo.pipeline.PipelineConfig` read through a :class:`Pipeline`, as the
app and the CLI read: each detector's full reading, its variants (``digit_demo.release.VARIANTS``:
detector only, no number reader, no proposer, multi-scale, fp32 where the default precision is
bf16), and every ensemble of two or more detectors with each fusion, at one size and two. Per row:
mAP / AP50 / whole-number accuracy at the best threshold of a full sweep, and for the single
models p50/p95 latency per image (batch 1, from the decoded photo to the number read; every reading
of an image timed in the same moment, the fastest of ``--repeats`` passes kept, as this shared host's
speed varies by tens of percent), images/s in batches of 8, peak RSS and the server-side cost of
one slider update in the app; an ensemble's latency adds up its members' plus its fusion.

``--load-test`` also serves the app and fires ``--calls`` API calls from ``--clients`` clients at
once, and reports refused and failed calls and the wait per call.

It writes only under ``--out`` (default ``out/benchmark``): ``results.json``, ``sweeps.json`` and
``table.md``. ``python -m digit_demo release --results out/benchmark`` ships them.

    python benchmark.py [--models a b c] [--threads 2] [--limit N] [--repeats 3] [--load-test]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from itertools import combinations, product
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data" / "svhn"
# The crops measured: `valid` by default; --gt / --images for another split (the reproduction's
# calibration measures the tuning split carved from train).
SPLIT = {"gt": DATA / "valid.json", "images": DATA / "valid"}


def _valid(limit: int | None) -> dict:
    from digit_demo.data import load_coco, subset

    gt = load_coco(SPLIT["gt"])
    return subset(gt, [im["id"] for im in gt["images"][:limit]]) if limit else gt


def _dets_json(d) -> dict:
    return {"boxes": d.boxes.tolist(), "scores": d.scores.tolist(), "digits": d.digits.tolist()}


def _dets(v: dict):
    from digit_demo.types import Detections

    return Detections(np.array(v["boxes"], np.float32).reshape(-1, 4), np.array(v["scores"], np.float32),
                      np.array(v["digits"], np.int64))


def _found_json(f) -> dict:
    line = None if f.line is None else {"log_probs": f.line.log_probs.tolist(), "margin": f.line.margin,
                                        "proposal": None if f.line.proposal is None else _dets_json(f.line.proposal)}
    text = None if f.text is None else asdict(f.text)
    return {"detections": _dets_json(f.detections), "line": line, "text": text}


def _found(v: dict):
    from digit_demo.types import Found, LineReading, TextReading

    line, text = v["line"], v.get("text")
    if line is not None:
        line = LineReading(np.array(line["log_probs"], np.float32), line["margin"],
                           None if line["proposal"] is None else _dets(line["proposal"]))
    return Found(_dets(v["detections"]), line, text=None if text is None else TextReading(**{**text, "box": tuple(text["box"])}))


def to_json(found: dict) -> dict:
    """Readings by image id as JSON: each region and what was found there, with what PP-OCR read on its
    line (a member's: no lead)."""
    return {k: {"name": r.name, "error": r.error, "regions": [
        {"box": g.box.tolist(), "score": g.score, "crop": list(g.crop), "whole": g.whole, "rank_power": g.rank_power,
         "raw": None if g.raw is None else _found_json(g.raw)} for g in r.regions]} for k, r in found.items()}


def from_json(found: dict) -> dict:
    """:func:`to_json` read back: readings by image id."""
    from digit_demo.pipeline import Reading, RegionReading

    return {int(k): Reading(v["name"], error=v["error"], regions=[
        RegionReading(np.array(g["box"], np.float32), g["score"], tuple(g["crop"]), None if g["raw"] is None else _found(g["raw"]),
                      g["rank_power"], g["whole"]) for g in v["regions"]]) for k, v in found.items()}


def measure(name: str, threads: int, limit: int | None, out: Path, repeats: int) -> None:
    """One detector's full reading and its variants, each image read from its file by
    :meth:`Pipeline.read_iter` as ``predict`` reads it; runs in a child process so that peak memory is
    the model's own."""
    from dataclasses import replace

    import torch

    from digit_demo.detect import set_threads
    from digit_demo.images import load_image
    from digit_demo.pipeline import Pipeline
    from digit_demo.release import variant_configs
    from digit_demo.session import Session, write_downloads

    set_threads(threads)
    images = _valid(limit)["images"]
    paths = [SPLIT["images"] / im["file_name"] for im in images]
    pipes = {v: Pipeline(c) for v, c in variant_configs(name).items()}  # one cache: the networks load once
    full = pipes["full"]
    for p in pipes.values():
        list(p.read_iter(paths[:4]))  # warm-up

    def read_one(p: Pipeline, path: Path):
        start = time.perf_counter()
        reading = next(p.read_iter([path]))
        reading.number(p.threshold)  # fresh detections: nothing cached yet
        return reading, (time.perf_counter() - start) * 1000

    passes, found = [], {}
    for _ in range(repeats):  # every reading of an image is timed in the same moment as the others
        lat = {v: [] for v in pipes}
        found = {v: {} for v in pipes}
        for im, path in zip(images, paths):
            for v, p in pipes.items():
                found[v][im["id"]], ms = read_one(p, path)
                lat[v].append(ms)
        passes.append(lat)

    def timing(variant: str) -> dict:
        """p50 and p95 over the images: the lowest of the passes (the one the host slowed least)."""
        return {f"p{q}_ms": min(float(np.percentile(p[variant], q)) for p in passes) for q in (50, 95)}

    start = time.perf_counter()
    list(full.read_iter(paths))
    batch_ips = len(paths) / (time.perf_counter() - start)
    # one slider update for one image, as the app does it: re-assemble, draw, write the downloads
    reading = replace(found["full"][images[0]["id"]], image=load_image(paths[0]))
    session = Session(full.name, [reading])
    slider = []
    for t in np.linspace(0.1, 0.9, 20):
        start = time.perf_counter()
        write_downloads(session.render(float(t)), float(t))
        slider.append((time.perf_counter() - start) * 1000)
    c = full.config
    out.write_text(json.dumps({
        "keys": {v: p.name for v, p in pipes.items()},
        **timing("full"), "p50_ms_per_pass": [float(np.percentile(p["full"], 50)) for p in passes],
        "batch_images_per_s": batch_ips,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "slider_update_ms": float(np.median(slider)),
        "threads": threads, "precision": c.precision, "torch": torch.__version__, "reader": c.digit_reader,
        "number_reader": c.number_reader, "proposer": c.proposer,
        **{v: timing(v) for v in pipes if v != "full"},
        "detections": {v: to_json(d) for v, d in found.items()},
    }))


def ensembles(names: list[str], raw: dict, curves: dict, results: dict, gt: dict) -> None:
    """Every group of two or more detectors, fused by each method, at one size and two, each image read
    from its file by the ensemble's :meth:`Pipeline.read_iter`, its members' detections taken from
    their own readings (``raw[key][image_id]``, through the pipeline's memo)."""
    from digit_demo.ensemble import FUSIONS
    from digit_demo.evaluation import sweep
    from digit_demo.pipeline import Pipeline, PipelineConfig, memo_of

    ids = [im["id"] for im in gt["images"]]
    paths = [SPLIT["images"] / im["file_name"] for im in gt["images"]]
    for k in range(2, len(names) + 1):
        for group, method, multi_scale in product(combinations(names, k), FUSIONS, (False, True)):
            members = [PipelineConfig((g,), multi_scale=multi_scale).key for g in group]
            if not all(m in raw for m in members):
                continue
            memo = {k: v for m in members for k, v in memo_of(m, raw[m].values()).items()}
            pipe = Pipeline(PipelineConfig(group, method, multi_scale=multi_scale), memo=memo)
            start = time.perf_counter()
            fused = dict(zip(ids, pipe.read_iter(paths)))
            fuse_ms = (time.perf_counter() - start) * 1000 / len(ids)
            curves[pipe.name] = sweep(gt, fused)
            # an ensemble reads each image (timed above: decode, fusion, the fused line) after its
            # members (their p50s)
            results[pipe.name] = {
                "members": members, "p50_ms": sum(results[m]["p50_ms"] for m in members) + fuse_ms,
                "p95_ms": sum(results[m]["p95_ms"] for m in members) + fuse_ms,
                "batch_images_per_s": None if multi_scale else 1 / sum(1 / results[g]["batch_images_per_s"] for g in group),
                "peak_rss_mb": None, "slider_update_ms": results[group[0]]["slider_update_ms"]}


def scene_configs(names: list[str] | None) -> dict:
    """The pipelines read on whole photos: the default (PP-OCR's text lines, where installed), the
    default with the CNN locator, and the weighted box fusion of every model."""
    from digit_demo.checkpoints import available
    from digit_demo.locator import DEFAULT_LOCATOR
    from digit_demo.pipeline import PipelineConfig

    names = names or available()
    configs = {"default": PipelineConfig()}
    if configs["default"].locator != DEFAULT_LOCATOR:
        configs["CNN locator"] = PipelineConfig(locator=DEFAULT_LOCATOR)
    if len(names) > 1:
        configs["ensemble"] = PipelineConfig(tuple(names), "wbf")
    return configs


def real_configs() -> dict:
    """The pipelines read on real_dev: the same as on the scenes (:func:`scene_configs`)."""
    return scene_configs(None)


def load_test(calls: int, clients: int, threads: int | None = None) -> dict:
    """Serve the app and fire ``calls`` reads of one example photo from ``clients`` clients at once
    (each client in a thread of this process, on the same machine as the server): how many were
    refused or failed, and the wait per call (from submitting it to its answer). The app serves with
    its own policy (``app.py``: one single-threaded reading per core), or ``threads`` per reading."""
    from gradio_client import Client, handle_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "DIGIT_DEMO_THREADS"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    if threads:
        env["DIGIT_DEMO_THREADS"] = str(threads)
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/"
        photo = handle_file(str(ROOT / "examples" / "10687.png"))
        waits, failures, lock = [], [], threading.Lock()
        todo = iter(range(calls))

        def client_loop():  # as a browser: the number and the images shown, no downloads fetched
            client = Client(url, verbose=False, download_files=False, ssl_verify=False)  # plain http: no CA bundle per request
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                start = time.perf_counter()
                try:
                    out = client.predict([photo], None, ["resnet18_fpn"], "wbf", 0.35, True, False, api_name="/read_numbers")
                    ok = bool(out[4]["data"])
                    error = None if ok else "no reading in the answer"
                except Exception as e:
                    error = f"{e.__class__.__name__}: {e}"
                with lock:
                    (failures.append(error) if error else waits.append(time.perf_counter() - start))

        start = time.perf_counter()
        pool = [threading.Thread(target=client_loop) for _ in range(clients)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = time.perf_counter() - start
    finally:
        app.terminate()
        app.wait(20)
    refused = sum("queue is full" in f.lower() for f in failures)
    return {"calls": calls, "clients": clients, "app_threads": threads or "app.py's", "ok": len(waits), "refused": refused, "failed": len(failures) - refused,
            "wait_p50_s": float(np.percentile(waits, 50)) if waits else None,
            "wait_p95_s": float(np.percentile(waits, 95)) if waits else None,
            "wait_max_s": float(max(waits)) if waits else None, "calls_per_s": len(waits) / wall,
            "errors": sorted(set(failures))[:5]}


def scene_sets(root: Path) -> dict[str, Path]:
    """The fixed scene sets (``train.scenes``): the 300 `valid` crops pasted into the benchmark's
    backgrounds (seed 1) and into the held-out packages' (seed 2); generated once into ``root``."""
    from train.scenes import background_pool, load_crops, write_scene_set

    sets = {"scenes": ("bench", 1), "scenes_heldout": ("heldout", 2)}
    out = {}
    for name, (pool, seed) in sets.items():
        path = root / name / "scenes.json"
        if not path.is_file():
            crops = load_crops(DATA / "valid.json", DATA / "valid")
            write_scene_set(crops, background_pool(pool), seed, path.parent)
        out[name] = path
    return out


def scene_rows(sets: dict[str, Path], configs: dict, threads: int) -> dict:
    """Each configuration on each scene set: accuracy and mAP at its threshold, and p50 / p95 per photo
    from the JPEG file to the number (decode, locate and read)."""
    from digit_demo.data import gt_numbers, load_coco
    from digit_demo.detect import set_threads
    from digit_demo.evaluation import coco_map, number_accuracy
    from digit_demo.io import coco_results
    from digit_demo.pipeline import Pipeline

    set_threads(threads)
    rows = {}
    for set_name, path in sets.items():
        gt = load_coco(path)
        truth = gt_numbers(gt)
        for label, config in configs.items():
            if set_name != "scenes" and label == "ensemble":
                continue
            pipe = Pipeline(config)
            pipe.read([path.parent / gt["images"][0]["file_name"]])  # warm-up
            times, kept, labels, located = [], {}, {}, 0
            for im in gt["images"]:
                start = time.perf_counter()
                reading = pipe.read([path.parent / im["file_name"]], keep_images=False)[0]
                number = reading.number(pipe.threshold)
                times.append((time.perf_counter() - start) * 1000)
                kept[im["id"]], labels[im["id"]] = reading.kept(pipe.threshold), number.label
                located += reading.located
            ap = coco_map(gt, coco_results(kept))
            shown = _shown(pipe)
            rows[f"{set_name}: {shown}"] = {
                "set": set_name, "pipeline": shown, "threshold": pipe.threshold, "accuracy": number_accuracy(truth, labels),
                **ap, "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
                "located_share": located / len(gt["images"]), "images": len(gt["images"])}
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[f"{set_name}: {shown}"].items()}),
                  file=sys.stderr)
    return rows


def _shown(pipe) -> str:
    """A pipeline's name in the scene and real_dev rows: its members and precision, and what locates."""
    return pipe.name + (f" ({pipe.config.locator})" if pipe.config.locator else "")


REAL = ROOT.parent / "shared" / "data" / "real_dev"
SIZES = ((0, 0.05, "<=5%"), (0.05, 0.10, "5-10%"), (0.10, 0.20, "10-20%"), (0.20, 1.01, ">20%"))


def real_rows(configs: dict, threads: int, rapidocr: bool = False) -> dict:
    """Each configuration on real_dev (real photos of house numbers; its labels and manifest):
    whole-number accuracy, by digit height (a share of the photo's, estimated by eye) and for vertical
    stacks, and p50 / p95 per photo from the file to the number. With ``rapidocr``, RapidOCR off the
    shelf on the same photos (its most confident run of digits)."""
    import csv
    import re

    from digit_demo.detect import set_threads
    from digit_demo.pipeline import Pipeline

    set_threads(threads)
    manifest = list(csv.DictReader((REAL / "manifest.tsv").open(), delimiter="\t"))
    paths = [REAL / m["file"] for m in manifest]

    def row(read) -> dict:
        read(paths[0])  # warm-up
        times, right = [], []
        for path, m in zip(paths, manifest):
            start = time.perf_counter()
            text = read(path)
            times.append((time.perf_counter() - start) * 1000)
            right.append(text == m["number"])
        out = {"accuracy": float(np.mean(right)), "images": len(paths), "p50_ms": float(np.percentile(times, 50)),
               "p95_ms": float(np.percentile(times, 95))}
        for lo, hi, name in SIZES:
            sel = [r for r, m in zip(right, manifest) if lo <= float(m["digit_height_frac"]) < hi]
            out[f"digits {name}"] = [int(sum(sel)), len(sel)]
        sel = [r for r, m in zip(right, manifest) if m["vertical"] == "yes"]
        out["vertical"] = [int(sum(sel)), len(sel)]
        return out

    rows = {}
    for label, config in configs.items():
        pipe = Pipeline(config)
        rows[f"{label}: {_shown(pipe)}"] = row(
            lambda p: next(pipe.read_iter([p])).number(pipe.threshold).text)
    if rapidocr:
        from rapidocr import RapidOCR

        engine = RapidOCR(params={"Global.log_level": "error"})

        def ocr(path) -> str:
            out = engine(str(path))
            runs = [(s, len(r), r) for t, s in zip(out.txts or [], out.scores or []) for r in re.findall(r"\d+", t)]
            return max(runs)[2] if runs else ""
        rows["RapidOCR 3.10, off the shelf"] = row(ocr)
    for key, r in rows.items():
        print(json.dumps({"row": key, **r}), file=sys.stderr)
    return rows


def table(results: dict, threads: int, repeats: int, images: int) -> str:
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {images} images of `{SPLIT['gt'].name}`, {threads} CPU threads; latency per "
             f"image at batch 1, the fastest of {repeats} passes; ensembles add up their members' latencies; "
             "accuracy and mAP at each row's best threshold.", "",
             "| pipeline | threshold | mAP | AP50 | accuracy | p50 ms | p95 ms | batch img/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        if key in ("load_test", "scenes", "real_dev"):
            continue
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"
        ips = f"{r['batch_images_per_s']:.1f}" if r.get("batch_images_per_s") else "-"
        lines.append(f"| {key} | {r['threshold']:.2f} | {r['mAP']:.3f} | {r['AP50']:.3f} | {r['accuracy']:.3f} "
                     f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {ips} | {rss} |")
    below = [k for k, r in results.items() if "beats_best_member" in r and not r["beats_best_member"]["accuracy"]]
    lines += ["", f"Ensembles below their best member's accuracy: {', '.join(below) or 'none'}."]
    if "scenes" in results:
        lines += ["", "Whole photos (`train.scenes`: each `valid` crop pasted into a 1.9-3 MP photo, digits 3-10% of its "
                      "height; `scenes_heldout`: backgrounds no model saw), per photo from the JPEG file to the number:", "",
                  "| set | pipeline | threshold | mAP | accuracy | p50 ms | p95 ms | located |", "|---|---|---|---|---|---|---|---|"]
        for r in results["scenes"].values():
            lines.append(f"| {r['set']} | {r['pipeline']} | {r['threshold']:.2f} | {r['mAP']:.3f} | {r['accuracy']:.3f} "
                         f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['located_share']:.2f} |")
    if "real_dev" in results:
        lines += ["", "real_dev (118 real photos of house numbers; digit height as a share of the photo's, by eye):", "",
                  "| reading | accuracy | " + " | ".join(f"digits {n}" for _, _, n in SIZES) + " | vertical | p50 ms | p95 ms |",
                  "|---|---|" + "---|" * len(SIZES) + "---|---|---|"]
        for key, r in results["real_dev"].items():
            cells = " | ".join(f"{r[f'digits {n}'][0]}/{r[f'digits {n}'][1]}" for _, _, n in SIZES)
            lines.append(f"| {key} | {r['accuracy']:.3f} | {cells} | {r['vertical'][0]}/{r['vertical'][1]} "
                         f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |")
    if "load_test" in results:
        lt = results["load_test"]
        lines += ["", f"Load test: {lt['calls']} calls from {lt['clients']} clients at once: {lt['ok']} answered, "
                      f"{lt['refused']} refused, {lt['failed']} failed; wait p50 {lt['wait_p50_s']:.1f} s, "
                      f"p95 {lt['wait_p95_s']:.1f} s, max {lt['wait_max_s']:.1f} s ({lt['calls_per_s']:.1f} calls/s)."]
    return "\n".join(lines)


def main() -> int:
    from digit_demo.detect import env_count

    try:
        threads = env_count("DIGIT_DEMO_THREADS", 2)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--threads", type=int, default=threads, help="threads per reading (default $DIGIT_DEMO_THREADS, else 2)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--repeats", type=int, default=3,
                    help="passes over the images; latency is the fastest pass's (this shared host's speed varies)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "benchmark")
    ap.add_argument("--no-ensembles", action="store_true")
    ap.add_argument("--load-test", action="store_true", help="also measure the app under a burst of API calls")
    ap.add_argument("--load-only", action="store_true", help="only the load test (merged into an existing results.json)")
    ap.add_argument("--scenes", action="store_true", help="also read whole photos (train.scenes; needs its background packages)")
    ap.add_argument("--scenes-only", action="store_true", help="only the scene sets (merged into results.json where one exists)")
    ap.add_argument("--real", action="store_true", help="also read real_dev (real photos; ../shared/data/real_dev)")
    ap.add_argument("--real-only", action="store_true", help="only real_dev (merged into results.json where one exists)")
    ap.add_argument("--rapidocr", action="store_true", help="with --real: RapidOCR off the shelf on the same photos")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--app-threads", type=int, help="threads per reading in the served app (default: app.py's policy, one)")
    ap.add_argument("--gt", type=Path, default=SPLIT["gt"], help="COCO json of the crops to measure (default: valid)")
    ap.add_argument("--images", type=Path, default=SPLIT["images"], help="their folder")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    SPLIT.update(gt=args.gt, images=args.images)
    if args._child:
        measure(args._child[0], args.threads, args.limit, Path(args._child[1]), args.repeats)
        return 0

    from digit_demo.checkpoints import available
    from digit_demo.evaluation import best, sweep
    from digit_demo.release import judge_ensembles

    args.out.mkdir(parents=True, exist_ok=True)
    if args.real_only or args.scenes_only:  # measured alone, merged into results.json where one exists
        path = args.out / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        if args.real_only:
            results["real_dev"] = real_rows(real_configs(), args.threads, args.rapidocr)
        if args.scenes_only:
            results["scenes"] = scene_rows(scene_sets(ROOT / "out"), scene_configs(args.models), args.threads)
        path.write_text(json.dumps(results, indent=2) + "\n")
        text = table(results, args.threads, args.repeats, 300)
        (args.out / "table.md").write_text(text + "\n")
        print(text)
        return 0
    if args.load_only:  # measured alone, merged into results.json where one exists
        path = args.out / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        results["load_test"] = load_test(args.calls, args.clients, args.app_threads)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["load_test"], indent=2))
        return 0
    names = args.models or available()
    gt = _valid(args.limit)
    results, raw, curves = {}, {}, {}
    for name in names:
        tmp = args.out / f"child_{name}.json"
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats), "--gt", str(args.gt),
               "--images", str(args.images), "--_child", name, str(tmp)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        subprocess.run(cmd, check=True)
        r = json.loads(tmp.read_text())
        keys, found = r.pop("keys"), r.pop("detections")
        for variant, key in keys.items():
            raw[key] = from_json(found[variant])
            curves[key] = sweep(gt, raw[key])
            results[key] = r if variant == "full" else {**r, **r[variant], "batch_images_per_s": None, "peak_rss_mb": None}
    if not args.no_ensembles:
        ensembles(names, raw, curves, results, gt)
    for key, rows in curves.items():
        b = best(rows)
        results[key].update({"threshold": b.threshold, "mAP": b.mAP, "AP50": b.AP50, "AP75": b.AP75, "accuracy": b.accuracy})
    judge_ensembles(results)
    if args.scenes:
        results["scenes"] = scene_rows(scene_sets(ROOT / "out"), scene_configs(names), args.threads)
    if args.real:
        results["real_dev"] = real_rows(real_configs(), args.threads, args.rapidocr)
    if args.load_test:
        results["load_test"] = load_test(args.calls, args.clients, args.app_threads)
    (args.out / "sweeps.json").write_text(json.dumps({k: [r.__dict__ for r in v] for k, v in curves.items()}, indent=1))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results, args.threads, args.repeats, len(gt["images"]))
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"wrote {args.out}; ship it with: python -m digit_demo release --results {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
