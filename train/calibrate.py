"""Gather a reproduction's checkpoints into one folder and measure them on the tuning split.

The reproduction's ``calibrate`` stage: copies every checkpoint in ``--checkpoints`` (folders or
files) into ``--out/checkpoints``, chooses how the readers and PP-OCR share a crop there
(``settle``, ``min_score_whole``) on ``--gt`` (the tuning split; :mod:`train.settle`), then runs
``benchmark.py`` there on ``--gt``, writing ``--out/benchmark``. The release step takes its thresholds
from that measurement; `valid` is measured apart (the ``report`` stage) and only reported.

    python -m train.calibrate --checkpoints runs/tune/checkpoints runs/locator/locator.safetensors \\
        --gt runs/splits/tune.json --images ../shared/data/svhn/train --out runs/calibrate
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from digit_demo.checkpoints import CHECKPOINTS_ENV
from digit_demo.release import copy_weights

ROOT = Path(__file__).resolve().parent.parent


def gather(sources: list[Path], out: Path) -> list[str]:
    """Copy the checkpoints (weights + sidecar) of each folder or file in ``sources`` into ``out``."""
    if out.exists():
        shutil.rmtree(out)
    return [p.stem for src in sources for p in copy_weights(src, out) if p.suffix == ".safetensors"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    p.add_argument("--gt", type=Path, required=True, help="the tuning split's COCO json")
    p.add_argument("--images", type=Path, required=True, help="its image folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--benchmark-args", nargs=argparse.REMAINDER, default=[], help="passed on to benchmark.py")
    args = p.parse_args(argv)
    folder = args.out / "checkpoints"
    names = gather(args.checkpoints, folder)
    print(f"gathered {', '.join(names)} into {folder}", file=sys.stderr)
    env = {**os.environ, CHECKPOINTS_ENV: str(folder.resolve())}
    settle = [sys.executable, "-m", "train.settle", "--gt", str(args.gt), "--images", str(args.images)]
    done = subprocess.run(settle, env=env, cwd=ROOT)
    if done.returncode:
        return done.returncode
    cmd = [sys.executable, str(ROOT / "benchmark.py"), "--gt", str(args.gt), "--images", str(args.images),
           "--out", str(args.out / "benchmark"), *args.benchmark_args]
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
