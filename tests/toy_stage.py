"""A stand-in trainer for the reproduction graph's tests: ``python -m tests.toy_stage --out DIR [--inputs F ...]``.

It writes ``DIR/out.txt`` (its own text plus its inputs'), counts its runs in ``DIR/runs.txt``,
keeps a ``DIR/state.txt`` between runs (what a trainer resumes from), works for as many seconds as
``DIR/slow`` says and exits 3 while ``DIR/fail`` exists (an interruption)."""
import argparse
import time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--out", type=Path, required=True)
p.add_argument("--inputs", type=Path, nargs="*", default=[])
p.add_argument("--text", default="")
args = p.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
runs = args.out / "runs.txt"
runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
state = args.out / "state.txt"
resumed = state.exists()
state.write_text("half done")
if (args.out / "slow").exists():
    time.sleep(float((args.out / "slow").read_text()))
if (args.out / "fail").exists():
    print("toy: told to fail")
    raise SystemExit(3)
text = args.text + "".join(f.read_text() for f in args.inputs)
(args.out / "out.txt").write_text(text + (" (resumed)" if resumed else ""))
