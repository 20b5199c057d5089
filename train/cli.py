"""``python -m train --model NAME --data DIR``: train a digit detector and export its checkpoint."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from digit_demo.checkpoints import load_checkpoint, measured, save_checkpoint
from digit_demo.data import DigitDataset, collate, load_coco, subset
from digit_demo.evaluation import rank
from digit_demo.inference import has_amx
from digit_demo.models import ARCHITECTURES, default_config, build_model

from . import engine
from .presets import eval_transforms, train_transforms
from .synth import set_paths

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "svhn"
DATA_SOURCE = "SVHN format 1 (HW2 COCO layout), ../shared/data/svhn"


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Where the training, validation and extra (resolved) images and labels are."""
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/, valid/, train.json, valid.json")
    p.add_argument("--train-json", default="train.json")
    p.add_argument("--val-json", default="valid.json")
    p.add_argument("--train-images", default="train", help="training image folder inside --data")
    p.add_argument("--val-images", default="valid", help="validation image folder inside --data")
    p.add_argument("--extra-json", type=Path, nargs="*", default=[],
                   help="more training labels (COCO json, e.g. written by python -m train.resolve), images in --extra-images")
    p.add_argument("--extra-images", default="unlabeled", help="image folder inside --data for --extra-json")
    p.add_argument("--synthetic", type=Path, nargs="*", default=[],
                   help="synthetic house numbers to train on too: folders written by python -m train.synth")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    p.add_argument("--config", type=Path, help="JSON file of option defaults (a shipped recipe in train/configs/)")
    p.add_argument("--model", choices=list(ARCHITECTURES), help="architecture to train")
    p.add_argument("--name", help="checkpoint name (default: the architecture without 'fasterrcnn_')")
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-schedule", choices=["step", "cosine"], default="step")
    p.add_argument("--lr-step", type=int, default=3, help="StepLR step, in epochs")
    p.add_argument("--lr-gamma", type=float, default=0.3)
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--focal-loss", action="store_true", help="focal loss in the box classifier")
    p.add_argument("--focal-alpha", type=float, default=0.25)
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--select", choices=["accuracy", "mAP"], default="accuracy",
                   help="which validation metric picks the exported epoch (the other breaks ties)")
    p.add_argument("--augment", choices=["default", "none"], default="default")
    p.add_argument("--tiers", nargs="*", help="label tiers to train on (default: all)")
    p.add_argument("--min-margin", type=float, help="drop resolved images below this resolver_margin")
    p.add_argument("--min-size", type=int, nargs="+", help="input short side(s); several = multi-scale training")
    p.add_argument("--max-size", type=int)
    p.add_argument("--limit", type=int, help="use only the first N training images")
    p.add_argument("--val-limit", type=int, help="validate on the first N images only")
    p.add_argument("--max-iters", type=int, help="stop each epoch after N batches (smoke tests)")
    p.add_argument("--time-budget", type=float,
                   help="train for this many seconds at most; the LR schedule then runs over the budget, not --epochs")
    p.add_argument("--amp", choices=["none", "bf16", "auto"], default="none",
                   help="bf16: the forward pass under bfloat16 autocast (fast where the CPU has AMX, or on a GPU; "
                        "on other CPUs many times slower); auto: bf16 on a GPU or an AMX CPU, none elsewhere")
    p.add_argument("--channels-last", action="store_true",
                   help="weights (and so activations) in channels-last memory format: faster convolutions on CPUs")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (0: in the training process)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--out-dir", type=Path, help="run folder: state, log, plots (default runs/NAME)")
    p.add_argument("--export-dir", type=Path, help="where the best epoch is exported (default: the run folder); "
                   "checkpoints/ takes it by copying, then benchmark.py and python -m digit_demo release")
    p.add_argument("--init-from", help="start from this checkpoint's weights (fine-tuning); it is only replaced if beaten")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a state")
    p.add_argument("--save-every", type=float, default=10.0,
                   help="also save the resumable state every N minutes within an epoch, so an interrupted epoch "
                        "resumes at its last save (0: at the end of each epoch only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args, _ = p.parse_known_args(argv)
    if args.config:
        p.set_defaults(**{k.replace("-", "_"): v for k, v in json.loads(args.config.read_text()).items()})
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model is required (or a --config that sets it)")
    args.name = args.name or args.model.replace("fasterrcnn_", "")
    args.out_dir = args.out_dir or Path("runs") / args.name
    args.export_dir = args.export_dir or args.out_dir
    return args


def _distributed() -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return torch.distributed.get_rank(), world
    return 0, 1


def recipe(args) -> dict:
    keys = ["epochs", "time_budget", "batch_size", "lr", "momentum", "weight_decay", "lr_schedule", "lr_step", "lr_gamma",
            "warmup_iters", "focal_loss", "focal_alpha", "focal_gamma", "augment", "select", "seed", "amp", "channels_last"]
    return {**{k: getattr(args, k) for k in keys}, **({"config": str(args.config)} if args.config else {})}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = _distributed()
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.amp = resolve_amp(args.amp, device)
    if args.focal_loss:
        engine.enable_focal_loss(args.focal_alpha, args.focal_gamma)

    overrides = {}
    if args.min_size:
        overrides["min_size"] = args.min_size[0] if len(args.min_size) == 1 else tuple(args.min_size)
    if args.max_size:
        overrides["max_size"] = args.max_size
    cfg = default_config(args.model, **overrides)
    parent = None
    if args.init_from:  # its sidecar fixes the architecture and input size
        model, parent = load_checkpoint(args.init_from)
    else:
        model = build_model(cfg)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)

    data = args.data
    train_set = DigitDataset(data / args.train_images, data / args.train_json, train_transforms(args.augment),
                             tiers=args.tiers, min_margin=args.min_margin, limit=args.limit)
    extra_sets = [DigitDataset(data / args.extra_images, path, train_transforms(args.augment)) for path in args.extra_json]
    synthetic = [DigitDataset(*set_paths(folder), train_transforms(args.augment)) for folder in args.synthetic]
    if extra_sets or synthetic:
        train_set = torch.utils.data.ConcatDataset([train_set, *extra_sets, *synthetic])
    val_set = DigitDataset(data / args.val_images, data / args.val_json, eval_transforms(), limit=args.val_limit)
    val_gt = load_coco(data / args.val_json)
    if args.val_limit:
        val_gt = subset(val_gt, [im["id"] for im in val_set.images])
    sampler = engine.EpochSampler(train_set, world, rank, seed=args.seed)
    # the loader draws its workers' seeds from its own generator, not from the global one that a resume restores
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                         generator=torch.Generator().manual_seed(args.seed + rank),
                                         num_workers=args.workers, collate_fn=collate, drop_last=True,
                                         persistent_workers=args.workers > 0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=8, num_workers=args.workers, collate_fn=collate)

    iters = len(loader) if not args.max_iters else min(len(loader), args.max_iters)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.out_dir / "last.pt"
    log_path = args.out_dir / "log.csv"
    resuming = state_path.exists() and not args.no_resume
    budget = None
    if args.time_budget:
        spent = engine.total_seconds(log_path) if resuming and log_path.exists() else 0.0
        budget = engine.TimeBudget(args.time_budget, spent)
    scheduler = engine.make_scheduler(optimizer, args.lr_schedule, args.epochs, iters, args.lr_step, args.lr_gamma,
                                      args.warmup_iters, budget)
    start_epoch = 0
    # epochs are scored by the detector alone: compare with the parent's detector-alone result where
    # benchmark.py has also measured it with the digit reader
    split = "valid" if Path(args.val_json).name == "valid.json" else "tune"  # what picks epochs: the sidecar says which
    best_row = (measured(parent, f"{split}_detector_only") or measured(parent, split) or None) if parent else None
    partial = None  # what the epoch being resumed did before its interruption
    if resuming:
        progress = engine.load_state(state_path, model, optimizer, scheduler)
        start_epoch, best_row, partial = progress["epoch"] + 1, progress["best"], progress.get("partial")
        if "rng" in progress and world == 1:  # under torchrun each rank keeps its own seed
            engine.set_rng_state(progress["rng"])
        where = f", batch {partial['batches']}" if partial else ""
        print(f"resumed from {state_path} at epoch {start_epoch}{where}", file=sys.stderr)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    data_info = {"train": str(args.train_json), "train_images": len(train_set), "tiers": args.tiers or "all",
                 "min_margin": args.min_margin,
                 "extra": [{"json": str(p), "images": args.extra_images, "count": len(d)} for p, d in zip(args.extra_json, extra_sets)],
                 "synthetic": [{"folder": str(f), "count": len(d)} for f, d in zip(args.synthetic, synthetic)],
                 "valid": str(args.val_json), "valid_images": len(val_set),
                 "source": DATA_SOURCE}

    def save(epochs_done: int, **progress) -> None:
        engine.save_state(state_path, model, optimizer, scheduler, epoch=epochs_done - 1, best=best_row,
                          rng=engine.rng_state(), args={k: str(v) for k, v in vars(args).items()}, **progress)

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        skip = partial["batches"] if partial else 0
        sampler.skip = skip * args.batch_size
        loader_iter = loader if not args.max_iters else _take(loader, args.max_iters - skip)
        stats = engine.train_one_epoch(train_model, optimizer, scheduler, loader_iter, device, epoch, show=not args.quiet,
                                       budget=budget, amp=args.amp, partial=partial,
                                       checkpoint=(lambda so_far, e=epoch: save(e, partial=so_far)) if rank == 0 else None,
                                       checkpoint_every=args.save_every * 60)
        partial = None
        out_of_time = budget is not None and budget.used_up()
        if world > 1:  # batch-norm statistics are each rank's own after its last step: take rank 0's, as DDP does
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer.data, 0)
        if rank != 0:
            if out_of_time:
                break
            continue
        top, rows = engine.evaluate(model, val_loader, val_gt, device)
        row = {"epoch": epoch, **{k: round(v, 5) for k, v in stats.items()}, "lr": optimizer.param_groups[0]["lr"],
               "val_threshold": top.threshold, "val_mAP": round(top.mAP, 4), "val_AP50": round(top.AP50, 4),
               "val_accuracy": round(top.accuracy, 4), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        engine.append_log(log_path, row)
        engine.plot_curves(log_path, args.out_dir / "curves.png")
        print(json.dumps(row), file=sys.stderr)
        if best_row is None or _score(top.__dict__, args.select) > _score(best_row, args.select):
            best_row = {"epoch": epoch, "threshold": top.threshold, "mAP": top.mAP, "AP50": top.AP50, "AP75": top.AP75,
                        "accuracy": top.accuracy}
            rec = recipe(args)
            if parent:
                rec["init_from"] = {"checkpoint": parent["name"], "recipe": parent.get("recipe"),
                                    "training": parent.get("training"), "metrics": measured(parent)}
            device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            meta = {"recipe": rec, "data": data_info, "device": str(device), "world_size": world, "device_name": device_name,
                    "metrics": {split: best_row}, "threshold": top.threshold,
                    "training": {"epochs_run": epoch + 1, "images_per_s": round(engine.mean_throughput(log_path), 2),
                                 "train_seconds": round(engine.total_seconds(log_path)),
                                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "device": device_name},
                    "sweep": [r.__dict__ for r in rows]}
            path = save_checkpoint(model, args.export_dir / args.name, meta)
            print(f"exported {path} (epoch {epoch}: accuracy {top.accuracy:.4f}, mAP {top.mAP:.4f})", file=sys.stderr)
        save(epoch + 1)
        if out_of_time:
            print(f"time budget of {args.time_budget:.0f} s used up after epoch {epoch}", file=sys.stderr)
            break
    if rank == 0 and parent and not (args.export_dir / f"{args.name}.safetensors").is_file():
        # never beaten: the parent stays the best, and the run folder still holds a checkpoint
        for suffix in (".safetensors", ".json"):
            shutil.copy(Path(parent["path"]).with_suffix(suffix), args.export_dir / f"{args.name}{suffix}")
        print(f"no epoch beat {args.init_from}; exported it unchanged", file=sys.stderr)
    if world > 1:
        write_rank_digest(model, args.out_dir, rank)
        torch.distributed.destroy_process_group()
    return 0


def resolve_amp(amp: str, device: torch.device) -> str:
    """``amp`` with "auto" decided for ``device``: bf16 on a GPU or a CPU with AMX, none elsewhere
    (bfloat16 autocast on a CPU without AMX ran a training step about 13x slower)."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and has_amx()) else "none"


def write_rank_digest(model: torch.nn.Module, out_dir: Path, rank: int) -> Path:
    """Write ``rank<k>.sha256``: a hash of this process's final weights (every rank's must match)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    path = out_dir / f"rank{rank}.sha256"
    path.write_text(h.hexdigest() + "\n")
    return path


def _score(row: dict, select: str) -> tuple[float, float]:
    """What ranks epochs: whole-number accuracy first (:func:`digit_demo.evaluation.rank`), or mAP first."""
    acc, m, _ = rank(row)
    return (acc, m) if select == "accuracy" else (m, acc)


def _take(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch
