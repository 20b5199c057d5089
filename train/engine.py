"""Training engine: one epoch, validation, resumable state, logs and plots."""
from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models.detection import roi_heads
from tqdm import tqdm

from digit_demo.detect import Detector
from digit_demo.evaluation import Metrics, best, sweep
from digit_demo.pipeline import Pipeline, PipelineConfig, Reading, Stages
from digit_demo.reader import DigitReader


def focal_fastrcnn_loss(alpha: float, gamma: float):
    """A ``fastrcnn_loss`` whose classification term is the (multi-class) focal loss."""

    def loss(class_logits, box_regression, labels, regression_targets):
        labels_cat = torch.cat(labels, 0)
        ce = F.cross_entropy(class_logits, labels_cat, reduction="none")
        p_t = torch.exp(-ce)
        weight = torch.where(labels_cat > 0, alpha, 1 - alpha)
        classification = (weight * (1 - p_t) ** gamma * ce).sum() / max(1, labels_cat.numel()) * 2
        _, box_loss = original(class_logits, box_regression, labels, regression_targets)
        return classification, box_loss

    original = roi_heads.fastrcnn_loss
    return loss


def enable_focal_loss(alpha: float, gamma: float) -> None:
    """Use focal loss in the box classifier of every Faster R-CNN in this process (training only)."""
    if not getattr(roi_heads.fastrcnn_loss, "_focal", False):
        fn = focal_fastrcnn_loss(alpha, gamma)
        fn._focal = True
        roi_heads.fastrcnn_loss = fn


class TimeBudget:
    """Training wall-clock budget in seconds; ``progress()`` is the fraction spent (resumable)."""

    def __init__(self, seconds: float, spent: float = 0.0):
        self.seconds, self.spent, self.start = seconds, spent, time.perf_counter()

    def progress(self) -> float:
        return min(1.0, (self.spent + time.perf_counter() - self.start) / self.seconds)

    def used_up(self) -> bool:
        """True once the budget is spent; under torchrun every rank agrees (any rank's clock decides)."""
        done = self.progress() >= 1.0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(done)], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            done = bool(flag.item())
        return done


def make_scheduler(optimizer, kind: str, epochs: int, iters_per_epoch: int, step: int, gamma: float, warmup: int,
                   budget: TimeBudget | None = None):
    """Per-iteration LR: linear warm-up, then StepLR (per ``step`` epochs) or cosine to zero.

    With a ``budget`` the schedule runs over the time budget instead of the iteration count, so a
    run that must stop after N minutes still anneals fully, however fast the machine is.
    """
    total = epochs * iters_per_epoch

    def factor(it: int) -> float:
        w = min(1.0, (it + 1) / warmup) if warmup else 1.0
        if kind == "cosine":
            done = budget.progress() if budget else min(it, total) / total
            return w * 0.5 * (1 + math.cos(math.pi * done))
        epoch = int(budget.progress() * epochs) if budget else it // iters_per_epoch
        return w * gamma ** (epoch // step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model, optimizer, scheduler, loader, device, epoch: int, log_every: int = 20, show: bool = True,
                    budget: TimeBudget | None = None, amp: str = "none", partial: dict | None = None,
                    checkpoint: Callable[[dict], None] | None = None, checkpoint_every: float = 0.0) -> dict:
    """One pass over ``loader`` (cut short when ``budget`` is used up); returns mean losses and throughput.
    ``amp="bf16"`` runs the forward pass under bfloat16 autocast (weights and optimizer stay float32).

    Mid-epoch resumption: ``checkpoint(partial)`` is called after a step whenever ``checkpoint_every``
    seconds have passed since the last call (never when it is 0); ``partial`` holds what this epoch has
    done so far (``batches``, ``images``, ``seconds``, loss ``sums``). Passing it back as ``partial``,
    with a ``loader`` that skips those batches, continues the epoch and its statistics."""
    model.train()
    done = partial or {}
    sums: dict[str, float] = dict(done.get("sums", {}))
    skipped, n_images, before = int(done.get("batches", 0)), int(done.get("images", 0)), float(done.get("seconds", 0.0))
    start = last_save = time.perf_counter()
    i = -1

    def so_far() -> dict:
        return {"batches": skipped + i + 1, "images": n_images, "seconds": before + time.perf_counter() - start,
                "sums": dict(sums)}

    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not show, mininterval=5, unit="batch")
    for i, (images, targets) in enumerate(bar):
        images = [im.to(device) for im in images]
        targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device), "labels": t["labels"].to(device)} for t in targets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            losses = model(images, targets)
        losses = {k: v.float() for k, v in losses.items()}
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, batch {skipped + i}: lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n_images += len(images)
        for k, v in {"loss": loss, **losses}.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        if budget and budget.used_up():
            break
        if checkpoint is not None and checkpoint_every > 0 and time.perf_counter() - last_save >= checkpoint_every:
            checkpoint(so_far())
            last_save = time.perf_counter()
        if i % log_every == 0:
            bar.set_postfix(loss=f"{sums['loss'] / (skipped + i + 1):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}",
                            ips=f"{n_images / (before + time.perf_counter() - start):.1f}")
    total = so_far()
    batches = max(1, total["batches"])
    return {**{k: v / batches for k, v in sums.items()}, "images_per_s": n_images / total["seconds"],
            "seconds": total["seconds"]}


@torch.inference_mode()
def predict(model, loader, device, reader: DigitReader | None = None) -> dict[int, Reading]:
    """Each validation image's reading by id, through :meth:`digit_demo.pipeline.Pipeline.read_iter`
    as ``predict`` reads an image (the detector on ``device``, re-read by the digit ``reader`` when one
    is given; each image read whole, as a crop)."""
    model.eval()
    config = PipelineConfig(digit_reader=None, number_reader=None, locator=None, threshold=0.5)
    out: dict[int, Reading] = {}
    for images, targets in loader:
        pipe = Pipeline(config, stages=Stages([Detector(model, {}, batch_size=len(images), reader=reader)], reader))
        # the loader's float images came from 8-bit files: back to 8 bits exactly, as the pipeline loads them
        arrays = [im.mul(255).round().byte().permute(1, 2, 0).cpu().numpy() for im in images]
        ids = [t["image_id"] for t in targets]
        out.update(zip(ids, pipe.read_iter(arrays, [str(i) for i in ids])))
    return out


def evaluate(model, loader, gt: dict, device, reader: DigitReader | None = None) -> tuple[Metrics, list[Metrics]]:
    """Sweep thresholds on the validation set; returns the best row and all rows."""
    rows = sweep(gt, predict(model, loader, device, reader))
    return best(rows), rows


class EpochSampler(torch.utils.data.DistributedSampler):
    """Shuffles each epoch as a function of ``(seed, epoch)`` alone (call ``set_epoch``), in one process
    or as rank ``rank`` of ``replicas``, so an interrupted epoch can resume where it stopped:
    ``skip`` drops the first samples of the next pass (this rank's), then resets to 0."""

    def __init__(self, dataset, replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self):
        order = list(super().__iter__())[self.skip:]
        self.skip = 0
        return iter(order)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def rng_state() -> dict:
    """This process's random states (torch, CUDA when present, Python's ``random``), for an exact resume."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


STATE_PARTS = ("model", "optimizer", "lr_scheduler", "generator")


def save_state(path: Path, model, optimizer, scheduler, generator: torch.Generator | None = None, **progress) -> None:
    """Write a trainer's resumable state to ``path``, atomically: the weights, the optimizer and
    scheduler, the random ``generator`` (when the trainer draws from one) and the trainer's own
    ``progress`` (epoch or step, best result, history, options). ``progress`` holds only tensors,
    numbers, strings, lists and dicts, so :func:`load_state` reads it back with ``weights_only=True``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
             **({"generator": generator.get_state()} if generator is not None else {}), **progress}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path, model, optimizer, scheduler, generator: torch.Generator | None = None) -> dict:
    """Restore what :func:`save_state` wrote into ``model``, ``optimizer``, ``scheduler`` and
    ``generator``; returns the saved ``progress``."""
    return restore_state(read_state(path), model, optimizer, scheduler, generator)


def read_state(path: Path) -> dict:
    """The state :func:`save_state` wrote, as saved (tensors on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_state(state: dict, model, optimizer, scheduler, generator: torch.Generator | None = None) -> dict:
    """Put a :func:`read_state` state into ``model``, ``optimizer``, ``scheduler`` and ``generator``;
    returns its ``progress``."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    if generator is not None:
        generator.set_state(state["generator"])
    return {k: v for k, v in state.items() if k not in STATE_PARTS}


def append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row), lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow(row)


def total_seconds(log_csv: Path) -> float:
    """Training time summed over the logged epochs (survives resumes)."""
    with log_csv.open() as f:
        return sum(float(r["seconds"]) for r in csv.DictReader(f))


def mean_throughput(log_csv: Path) -> float:
    """Training images per second over all logged epochs (a short last epoch weighs little)."""
    with log_csv.open() as f:
        rows = [(float(r["images_per_s"]), float(r["seconds"])) for r in csv.DictReader(f)]
    return sum(ips * s for ips, s in rows) / max(sum(s for _, s in rows), 1e-9)


def plot_curves(log_csv: Path, out_png: Path) -> None:
    """Training loss and validation mAP / accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with log_csv.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for key in ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        if key in rows[0]:
            a.plot(ep, [float(r[key]) for r in rows], marker=".", label=key)
    a.set_title("training loss")
    a.set_xlabel("epoch")
    a.legend(fontsize=7)
    for key in ("val_mAP", "val_AP50", "val_accuracy"):
        b.plot(ep, [float(r[key]) for r in rows], marker=".", label=key)
    b.set_title("validation (best threshold)")
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
