"""Train the house-number locator (``digit_demo.locator``) from scratch on synthetic scenes.

Every step draws fresh scenes (``train.scenes.compose``): ``train`` crops pasted, at 2.5-15% of the
scene's height, into the training backgrounds at the locator's input size, with distractor patches;
some scenes hold two numbers and some none. A fixed tuning set (scenes from the last
``--tune-crops`` train crops, which training never pastes, on the training backgrounds, with a seed
of its own) picks the checkpoint; then the score threshold and fallback are chosen by what the default
pipeline reads on full-size tuning scenes (:func:`tune_reading`). ``valid`` is never used here.

    python -m train.locator --steps 1500 --out runs/locator/locator.safetensors
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from digit_demo.locator import INPUT_SIDE, STRIDE, Locator, regions_from_map, save_locator

from . import engine
from .scenes import SIZES, background_pool, compose, load_crops, open_background

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "svhn"


def scene_sizes(side: int = INPUT_SIDE) -> list[tuple[int, int]]:
    """The scene sizes, shrunk to the locator's input side (multiples of STRIDE)."""
    out = []
    for w, h in SIZES:
        s = side / max(w, h)
        out.append((round(w * s / STRIDE) * STRIDE, round(h * s / STRIDE) * STRIDE))
    return out


SHARES = ((0.025, 0.15), (0.15, 0.4))  # digit height / scene height: street photos, and close-ups (15%)


def sample(crops, backgrounds, rng: np.random.Generator, sizes):
    """One training scene: none, one or two numbers (10% / 75% / 15%), digits mostly 2.5-15% of the
    scene's height (a close-up's 15-40% in one scene of seven)."""
    k = int(rng.choice(3, p=[0.1, 0.75, 0.15]))
    numbers = [crops[i] for i in rng.integers(len(crops), size=k)]
    size = sizes[rng.integers(len(sizes))]
    share = SHARES[int(rng.random() < 0.15)]
    return compose(numbers, backgrounds[rng.integers(len(backgrounds))], rng, size=size, digit_share=share,
                   others=backgrounds, margins=crops, blur=0.6)


def targets(regions: list[list[float]], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The centre heat map (Gaussians at each region's centre, H/8 x W/8), the regression targets
    (dx, dy, log w, log h in cells) and where they apply (each region's centre cell)."""
    gh, gw = height // STRIDE, width // STRIDE
    heat = torch.zeros(gh, gw)
    reg = torch.zeros(4, gh, gw)
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    for x1, y1, x2, y2 in regions:
        cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
        w, h = max((x2 - x1) / STRIDE, 0.25), max((y2 - y1) / STRIDE, 0.25)
        sx, sy = max(w / 6, 0.5), max(h / 6, 0.5)
        heat = torch.maximum(heat, torch.exp(-((xs + 0.5 - cx) ** 2 / (2 * sx**2) + (ys + 0.5 - cy) ** 2 / (2 * sy**2))))
        i, j = min(gh - 1, int(cy)), min(gw - 1, int(cx))
        heat[i, j] = 1.0
        reg[:, i, j] = torch.tensor([cx - j, cy - i, math.log(w), math.log(h)])
        mask[i, j] = True
    return heat, reg, mask


def batch(crops, backgrounds, rng, sizes, n: int):
    """``n`` scenes of one size (so they stack), with their targets and regions."""
    size = sizes[rng.integers(len(sizes))]
    images, heats, regs, masks, regions = [], [], [], [], []
    for _ in range(n):
        scene = sample(crops, backgrounds, rng, [size])
        images.append(pil_to_tensor(scene.image).float().div(255))
        h, r, m = targets(scene.regions, size[1], size[0])
        heats.append(h), regs.append(r), masks.append(m), regions.append(scene.regions)
    return torch.stack(images), torch.stack(heats), torch.stack(regs), torch.stack(masks), regions


def loss_fn(out: torch.Tensor, heat: torch.Tensor, reg: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """CenterNet's penalty-reduced focal loss on the centre map, plus L1 on offset and log size at
    the centre cells."""
    p = out[:, 0].sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    focal = -(pos * (1 - p) ** 2 * p.log() + (1 - pos) * (1 - heat) ** 4 * p**2 * (1 - p).log()).sum()
    n = pos.sum().clamp(min=1)
    offsets = out[:, 1:3].permute(0, 2, 3, 1)[mask]
    sizes = out[:, 3:5].permute(0, 2, 3, 1)[mask]
    target = reg.permute(0, 2, 3, 1)[mask]
    l1_off = (offsets - target[:, :2]).abs().sum() / n
    l1_size = (sizes - target[:, 2:]).abs().sum() / n
    total = focal / n + l1_off + 0.5 * l1_size
    return total, {"focal": float(focal.detach() / n), "offset": float(l1_off.detach()), "size": float(l1_size.detach())}


@torch.inference_mode()
def evaluate(model: Locator, tune: list, thresholds=(0.1, 0.15, 0.2, 0.3, 0.4, 0.5)) -> list[dict]:
    """Per score threshold, on the tuning scenes: the share of numbers whose region is found (a
    region with IoU >= 0.5) and the share of found regions that are a number's."""
    model.eval()
    outs = [(model(img[None])[0], regions) for img, regions in tune]
    rows = []
    for t in thresholds:
        hit = total = kept = right = 0
        for out, regions in outs:
            found = regions_from_map(out, 1.0, 1.0, t)
            total += len(regions)
            kept += len(found)
            if found and regions:
                iou = box_iou(torch.tensor(np.stack([f.box for f in found])), torch.tensor(regions))
                hit += int((iou.amax(0) >= 0.5).sum())
                right += int((iou.amax(1) >= 0.5).sum())
        rows.append({"min_score": t, "recall": hit / max(total, 1), "precision": right / max(kept, 1)})
    return rows


SCORE_OPTIONS = (0.5, 0.3, 0.2)  # a region's least centre score
# (pad x, pad y): how a region is cropped (:func:`digit_demo.locator.reading_box`)
READ_OPTIONS = ((0.5, 0.25), (1.0, 0.25), (1.5, 0.25), (1.0, 0.4), (1.5, 0.4))
RANK_POWERS = (0.0, 0.5, 1.0)


def tune_reading(checkpoint: Path, data: Path, tune_crops: int = 300, seed: int = 123, crops: list | None = None,
                 backgrounds: list | None = None) -> dict:
    """Choose how the locator's regions are read by what the default pipeline then reads, on
    full-size tuning scenes (the last ``tune_crops`` train crops, which training never pastes, on the
    training backgrounds): first the score threshold (:data:`SCORE_OPTIONS`), then the padding
    (:data:`READ_OPTIONS`), and with each the rank
    power (:data:`RANK_POWERS`, which re-ranks the same readings). Ties go to the earlier option (the
    simpler). ``crops`` and ``backgrounds`` replace the defaults (the reproduction's tuning split, a
    folder of photos). Writes the choice and every option's result into the checkpoint's sidecar."""
    from digit_demo.locator import PAD_X, PAD_Y
    from digit_demo.pipeline import Pipeline, PipelineConfig

    from .scenes import scene_set

    crops = crops if crops is not None else load_crops(data / "train.json", data / "train")[-tune_crops:]
    scenes = list(scene_set(crops, backgrounds or background_pool("train"), seed, margins=crops))
    pipe = Pipeline(PipelineConfig(locator=str(checkpoint)))
    loc, rows = pipe.locator, []

    def run(min_score, pad_x, pad_y, stage):
        loc.settings = replace(loc.settings, min_score=min_score, pad=(pad_x, pad_y))
        readings = pipe.read([sc.image for sc in scenes], keep_images=False)
        for power in RANK_POWERS if stage == "read" else (0.0,):
            for r in readings:
                for region in r.regions:
                    region.rank_power = power
            rows.append({"stage": stage, "min_score": min_score, "pad_x": pad_x, "pad_y": pad_y, "rank_power": power,
                         "accuracy": sum(r.number(pipe.threshold).text == sc.texts[0] for r, sc in zip(readings, scenes)) / len(scenes),
                         "located": sum(r.located for r in readings) / len(scenes)})
            print(json.dumps(rows[-1]), file=sys.stderr)

    def best(stage):
        return max((r for r in rows if r["stage"] == stage), key=lambda r: round(r["accuracy"], 6))  # first of ties

    for min_score in SCORE_OPTIONS:
        run(min_score, PAD_X, PAD_Y, "score")
    top = best("score")
    for pad_x, pad_y in READ_OPTIONS:
        run(top["min_score"], pad_x, pad_y, "read")
    top = best("read")
    side = checkpoint.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["tuned"].update(min_score=top["min_score"], pad=[top["pad_x"], top["pad_y"]], rank_power=top["rank_power"],
                         chosen_on=f"tuning scenes: {len(crops)} held-out train crops (never pasted in training) on the "
                                   f"training backgrounds, seed {seed}, read by the default pipeline")
    meta["locate_tuning"] = {"scenes": len(scenes), "rows": rows}
    side.write_text(json.dumps(meta, indent=2) + "\n")
    return top


def merit(row: dict) -> float:
    """How good a threshold is: recall first (a number not found is not read), precision second (a
    false region costs a reading, and the readers' confidence settles between regions)."""
    return round(row["recall"] * (0.5 + 0.5 * row["precision"]), 6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--tune-crops", type=int, default=300, help="the last N train crops: tuning scenes, never pasted")
    p.add_argument("--train-json", default="train.json", help="the crops to paste (COCO json in --data, images in train/)")
    p.add_argument("--tune-json", help="the tuning crops instead of the last --tune-crops (e.g. the tuning split)")
    p.add_argument("--backgrounds", type=Path, help="a folder of photos instead of the training background pool")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--limit", type=int, help="only the first N train crops (smoke runs)")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/locator/locator.safetensors"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--tune-only", action="store_true", help="only choose the threshold of the exported locator")
    args = p.parse_args(argv)
    pool = sorted(args.backgrounds.glob("*.jpg")) + sorted(args.backgrounds.glob("*.png")) if args.backgrounds else None
    crops = load_crops(args.data / args.train_json, args.data / "train", args.limit)
    if args.tune_json:
        tune_crops = load_crops(args.data / args.tune_json, args.data / "train", args.limit)
    else:
        tune_crops, crops = crops[-args.tune_crops:], crops[: -args.tune_crops] or crops
    if args.tune_only:
        print(json.dumps(tune_reading(args.out, args.data, crops=tune_crops, backgrounds=pool)), file=sys.stderr)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    backgrounds = [open_background(b, 1024) for b in pool or background_pool("train")]
    sizes = scene_sizes()
    tune_rng = np.random.default_rng(10_000 + args.seed)
    tune = []
    for crop in tune_crops:
        scene = compose([crop], backgrounds[tune_rng.integers(len(backgrounds))], tune_rng,
                        size=sizes[tune_rng.integers(len(sizes))], digit_share=(0.03, 0.10), others=backgrounds,
                        margins=tune_crops, blur=0.6)
        tune.append((pil_to_tensor(scene.image).float().div(255), scene.regions))

    model = Locator(args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    run = args.out.parent
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "last.pt"
    step, history, best = 0, [], None
    if state_path.is_file():  # resume
        progress = engine.load_state(state_path, model, opt, sched)
        step, history, best = progress["step"], progress["history"], progress["best"]
        rng = np.random.default_rng([args.seed, step])
    start, seen = time.time(), 0
    bar = tqdm(total=args.steps, initial=step, unit="step", disable=args.quiet)
    while step < args.steps:
        model.train()
        images, heat, reg, mask, _ = batch(crops, backgrounds, rng, sizes, args.batch_size)
        loss, parts = loss_fn(model(images), heat, reg, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        seen += len(images)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            rows = evaluate(model, tune)
            top = max(rows, key=merit)
            history.append({"step": step, "loss": loss.item(), **parts, "images_per_s": seen / (time.time() - start),
                            "tune": rows})
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), **top}), file=sys.stderr)
            if best is None or merit(top) > merit(best):
                best = {"step": step, **top}
                model.settings = replace(model.settings, min_score=top["min_score"])
                save_locator(model, args.out, {
                    "recipe": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "width", "seed", "tune_crops")},
                    "data": {"crops": f"{args.train_json} ({len(crops)} crops)",
                             "tune_crops": f"{args.tune_json or 'the last of train.json'} ({len(tune_crops)} crops)",
                             "backgrounds": str(args.backgrounds or "train.scenes.background_pool('train')"),
                             "digit_share": [list(SHARES[0]), list(SHARES[1])]},
                    "metrics": {"tune_scenes": best},
                    "training": {"steps_run": step, "images_per_s": round(seen / (time.time() - start), 1),
                                 "train_seconds": round(time.time() - start), "device": "cpu",
                                 "threads": torch.get_num_threads(), "torch": torch.__version__},
                    "history": history})
            engine.save_state(state_path, model, opt, sched, step=step, history=history, best=best)
    bar.close()
    print(f"exported {args.out} (step {best['step']}: recall {best['recall']:.3f}, precision {best['precision']:.3f})",
          file=sys.stderr)
    if args.limit is None or args.tune_json:  # choose how regions are read by what the pipeline reads
        print(json.dumps(tune_reading(args.out, args.data, crops=tune_crops, backgrounds=pool)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
