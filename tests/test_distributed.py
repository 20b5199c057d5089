"""Distributed training through torchrun: two CPU processes (gloo) train the detector a few steps,
end with identical weights, and resume."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FIXTURES

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def torchrun(out: Path, epochs: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
           "--model", "fasterrcnn_resnet18_fpn", "--name", "ddp", "--data", str(FIXTURES), "--train-json", "valid.json",
           "--train-images", "valid", "--val-json", "valid.json", "--out-dir", str(out), "--epochs", str(epochs),
           "--max-iters", "2", "--batch-size", "2", "--lr", "0.01", "--lr-schedule", "cosine", "--min-size", "96",
           "--max-size", "240", "--augment", "none", "--threads", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIGIT_DEMO_CHECKPOINTS": str(out / "none")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def digests(out: Path) -> list[str]:
    return [(out / f"rank{r}.sha256").read_text() for r in (0, 1)]


def test_two_cpu_processes_train_to_identical_weights_and_resume(tmp_path):
    out = tmp_path / "run"
    first = torchrun(out, 1)
    assert first.returncode == 0, first.stderr[-3000:]
    a0, a1 = digests(out)
    assert a0 == a1  # DDP kept both replicas identical
    assert (out / "ddp.safetensors").is_file()
    second = torchrun(out, 2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at epoch 1" in second.stderr
    b0, b1 = digests(out)
    assert b0 == b1 and b0 != a0  # the resumed epoch trained both replicas alike
    with (out / "log.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
