"""Measure (and profile) detector training speed: images/s over real training steps.

Builds each model and trains it as its reproduction stage does (``train/configs/reproduce/<name>.json``:
input sizes, batch size, autocast, memory format, data-loading processes; each can be overridden),
feeds it ``train`` images with the training augmentation, and times ``--iters`` steps after
``--warmup`` steps. ``--profile`` prints the operators that take the most time (torch.profiler).

    python -m train.speed --models resnet18_fpn                         # as the stage trains
    python -m train.speed --models resnet18_fpn --amp none bf16 --batch-size 4 --no-channels-last --workers 0
    python -m train.speed --models resnet18_fpn --choose --iters 8    # the fastest options, as JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

import torch

from digit_demo.data import DigitDataset, collate
from digit_demo.detect import set_threads
from digit_demo.models import build_model, default_config

from . import engine
from .cli import DEFAULT_DATA, resolve_amp
from .presets import train_transforms

CONFIGS = Path(__file__).resolve().parent / "configs" / "reproduce"


def stage_options(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())["run"]["options"]


def measure(name: str, amp: str | None, iters: int, warmup: int, data: Path, profile: bool = False,
            channels_last: bool | None = None, batch_size: int | None = None, workers: int | None = None) -> dict:
    """Images/s of ``iters`` training steps of stage ``name``; every None setting is the stage's own."""
    opts = stage_options(name)
    amp = resolve_amp(amp or opts.get("--amp", "none"), torch.device("cpu"))
    channels_last = bool(opts.get("--channels-last")) if channels_last is None else channels_last
    workers = int(opts.get("--workers", 0)) if workers is None else workers
    sizes = opts.get("--min-size")
    overrides = {"max_size": opts["--max-size"]} if "--max-size" in opts else {}
    if sizes:
        overrides["min_size"] = sizes[0] if len(sizes) == 1 else tuple(sizes)
    torch.manual_seed(0)
    model = build_model(default_config(opts["--model"], **overrides))
    model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch = batch_size or int(opts.get("--batch-size", 4))
    dataset = DigitDataset(data / "train", data / "train.json", train_transforms("default"), limit=batch * (iters + warmup))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=collate, drop_last=True,
                                         num_workers=workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches, cpu = iter(loader), torch.device("cpu")
    if warmup:  # the trainer's own step (engine.train_one_epoch), untimed
        engine.train_one_epoch(model, optimizer, scheduler, islice(batches, warmup), cpu, 0, show=False, amp=amp)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    if prof:
        prof.__enter__()
    stats = engine.train_one_epoch(model, optimizer, scheduler, islice(batches, iters), cpu, 1, show=False, amp=amp)
    seen, seconds = iters * batch, stats["seconds"]
    if prof:
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    return {"model": name, "amp": amp, "channels_last": channels_last, "batch_size": batch, "workers": workers, "images": seen, "seconds": round(seconds, 2),
            "images_per_s": round(seen / seconds, 2), "threads": torch.get_num_threads(), "torch": torch.__version__}


def choose(name: str, data: Path, iters: int = 8, warmup: int = 2) -> dict:
    """The fastest way this machine trains stage ``name``: its steps timed with and without a
    data-loading process and with and without channels-last weights (``iters`` steps each, after
    ``warmup``), as the options the reproduction sets (``--workers``, ``--channels-last``), with the
    images/s of each way tried."""
    rows = [measure(name, None, iters, warmup, data, channels_last=cl, workers=w) for w in (0, 1) for cl in (False, True)]
    top = max(rows, key=lambda r: r["images_per_s"])
    return {"--workers": top["workers"], "--channels-last": top["channels_last"], "images_per_s": top["images_per_s"],
            "tried": [{k: r[k] for k in ("workers", "channels_last", "images_per_s")} for r in rows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18_fpn", "resnet34_fpn", "mobilenet_v3_fpn"])
    p.add_argument("--amp", nargs="+", choices=["none", "bf16", "auto"], default=[None],
                   help="autocast setting(s) to time (default: the stage's)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="weights in channels-last memory format (default: the stage's)")
    p.add_argument("--batch-size", type=int, help="instead of the stage's batch size")
    p.add_argument("--workers", type=int, help="data-loading processes (default: the stage's)")
    p.add_argument("--choose", action="store_true", help="time each way to run --models (loader process, memory "
                   "format) and print the fastest as JSON, {stage: options} (what train.reproduce uses)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.choose:
        print(json.dumps({name: choose(name, args.data, args.iters, args.warmup) for name in args.models}))
        return 0
    for name in args.models:
        for amp in args.amp:
            print(json.dumps(measure(name, amp, args.iters, args.warmup, args.data, args.profile, args.channels_last,
                                     args.batch_size, args.workers)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
