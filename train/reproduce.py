"""``python -m train.reproduce``: rebuild every shipped checkpoint from a clean clone, stage by stage.

The graph (:data:`GRAPH`) is an ordered list of stages; each has a config file,
``train/configs/reproduce/<stage>.json``, that says what it runs (``run``: a module and its
options), which stages' outputs it reads (``needs``; options name them by path, as
``{runs}/<stage>/...``, never by a shipped name), what it writes under ``runs/<stage>/``
(``outputs``), how long it takes (``minutes``: per device), its ``smoke`` options (a step or two),
any ``env`` and any ``setup`` (commands a full run needs first, e.g. installing the scene backgrounds).
Every stage runs with ``DIGIT_DEMO_CHECKPOINTS`` set to an empty folder unless its ``env`` names one
of the runs' folders, so no stage can read a shipped checkpoint or calibration.
Placeholders in options: ``{data}`` (the dataset), ``{runs}`` (the runs folder), ``{out}`` (this
stage's folder), ``{release}`` (where the release step writes: ``checkpoints/`` unless ``--release-dir``).

A stage is up to date when its ``runs/<stage>/done.json`` holds the fingerprint it would have now:
the hash of its config (less its notes: ``about``, ``minutes``), the mode (full or smoke) and the
fingerprints of the stages it needs. Up to date stages are skipped; a stage whose folder was started
with another fingerprint is cleared; an interrupted stage is run again and its trainer resumes from the
state it left in its folder. A stage's time (``done.json``: ``seconds``, ``attempts``) is the sum over
its attempts, kept in ``spent.json`` while it runs. Only the ``release`` stage writes ``checkpoints/``.

    python -m train.reproduce --plan            # the stages, their state and time estimates
    python -m train.reproduce                   # run (again) whatever is not up to date
    python -m train.reproduce --only locator    # one stage (its inputs must be up to date)
    python -m train.reproduce --from digit_reader
    python -m train.reproduce --smoke --runs /tmp/smoke --release-dir /tmp/smoke/release
    python -m train.reproduce --nproc 2         # detector stages in 2 processes (DDP)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from digit_demo.checkpoints import CHECKPOINTS_ENV
from digit_demo.inference import has_amx

from .cli import DEFAULT_DATA

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "train" / "configs" / "reproduce"
GRAPH = ("splits", "resnet18_fpn", "pseudo_r1", "resnet18_fpn_self", "pseudo_r2", "resnet34_fpn", "mobilenet_v3_fpn",
         "synth_real", "digit_reader", "number_reader", "number_proposer", "tune", "locator", "calibrate", "report", "release")
# config keys that describe a stage without changing what it makes: notes, and ``speed`` (the options the
# runner sets per machine, by train.speed: how fast it runs, e.g. a loader process or the memory format)
NOTES = ("about", "minutes", "minutes_basis", "speed")
HEARTBEAT = 30.0  # seconds between writes of a running stage's spent.json (its time survives the machine stopping)
NO_AMX = ("this CPU has no AMX: the detector stages train in float32 (bfloat16 has no hardware here), so they take "
          "about twice their estimates, which were measured with AMX (docs/design.md: Reproduction on other CPUs)")


@dataclass(frozen=True)
class Stage:
    """One stage of the graph, as its config file declares it."""

    name: str
    config: dict

    @classmethod
    def load(cls, name: str, configs: Path = CONFIGS) -> "Stage":
        path = configs / f"{name}.json"
        config = json.loads(path.read_text())
        for key in ("run", "needs", "outputs", "minutes"):
            if key not in config:
                raise ValueError(f"{path}: no {key!r}")
        return cls(name, config)

    @property
    def needs(self) -> list[str]:
        return list(self.config["needs"])

    def setup(self, smoke: bool, places: dict[str, str]) -> list[list[str]]:
        """The commands a full run of the stage needs first (``setup``: runs like ``run``, e.g. installing
        the scene backgrounds); smoke runs have none (they bring their own inputs)."""
        return [] if smoke else [_command(run, dict(run.get("options", {})), places) for run in self.config.get("setup", [])]

    @property
    def speed(self) -> list[str]:
        """The options the runner chooses per machine (``"speed"`` in the config; :func:`train.speed.choose`)."""
        return list(self.config.get("speed", []))

    def speed_key(self) -> str:
        """What a speed choice for this stage depends on besides the machine: its model, sizes, batch, autocast."""
        options = self.config["run"]["options"]
        return json.dumps({k: options[k] for k in ("--model", "--min-size", "--max-size", "--batch-size", "--amp")
                           if k in options} or {"stage": self.name}, sort_keys=True)

    def argv(self, smoke: bool, places: dict[str, str], torchrun: list[str] | None = None,
             speed: dict | None = None) -> list[str]:
        """The command line: ``python -m <module>`` with its options, smoke overrides applied, then the
        options chosen for this machine (``speed``: :meth:`Reproduction.speed_for`); a distributed stage
        (``"distributed": true``) under ``torchrun`` when its arguments are given (each process then
        gets its share of ``--threads``)."""
        options = dict(self.config["run"]["options"])
        if smoke:
            options.update(self.config.get("smoke", {}))
        options.update(speed or {})
        run = self.config["run"]
        prefix = None
        if torchrun and self.config.get("distributed") and "script" not in run:
            prefix = [sys.executable, "-m", "torch.distributed.run", *torchrun]
            per_node = int(torchrun[torchrun.index("--nproc_per_node") + 1]) if "--nproc_per_node" in torchrun else 1
            if "--threads" in options:
                options["--threads"] = max(1, int(options["--threads"]) // per_node)
        return _command(run, options, places, prefix)

    def env(self, places: dict[str, str]) -> dict[str, str]:
        return {k: str(v).format(**places) for k, v in self.config.get("env", {}).items()}

    def fingerprint(self, smoke: bool, inputs: dict[str, str]) -> str:
        """What the stage does (its config less the notes in :data:`NOTES`), the mode and its inputs'
        fingerprints: correcting a time estimate or a description never makes a finished stage stale."""
        does = {k: v for k, v in self.config.items() if k not in NOTES}
        h = hashlib.sha256(json.dumps(does, sort_keys=True).encode())
        h.update(b"smoke" if smoke else b"full")
        for name in self.needs:
            h.update(f"{name}={inputs[name]}".encode())
        return h.hexdigest()[:16]


def _command(run: dict, options: dict, places: dict[str, str], prefix: list[str] | None = None) -> list[str]:
    """``python <script>`` or ``python -m <module>`` (after ``prefix``, e.g. torchrun) with ``options``."""
    if "script" in run:
        argv = [sys.executable, str(ROOT / run["script"])]
    else:
        argv = [*(prefix or [sys.executable]), "-m", *run["module"].split()]
    for key, value in options.items():
        if value is None or value is False:
            continue
        argv.append(key)
        if value is True:
            continue
        argv += [str(v).format(**places) for v in (value if isinstance(value, list) else [value])]
    return argv


def load_graph(configs: Path = CONFIGS) -> list[Stage]:
    stages = [Stage.load(name, configs) for name in GRAPH]
    seen: set[str] = set()
    for stage in stages:
        missing = [n for n in stage.needs if n not in seen]
        if missing:
            raise ValueError(f"stage {stage.name} needs {missing}, which do not come before it")
        seen.add(stage.name)
    return stages


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Reproduction:
    """The graph over one runs folder, in full or smoke mode."""

    def __init__(self, runs: Path, data: Path, release: Path, smoke: bool = False, device: str = "cpu",
                 configs: Path = CONFIGS, torchrun: list[str] | None = None, probe=None):
        self.runs, self.data, self.release, self.smoke, self.device = runs, data, release, smoke, device
        self.torchrun = torchrun
        self.probe = probe or self._probe
        self.stages = load_graph(configs)
        self.by_name = {s.name: s for s in self.stages}

    def folder(self, stage: Stage) -> Path:
        return self.runs / stage.name

    def places(self, stage: Stage) -> dict[str, str]:
        return {"data": str(self.data), "runs": str(self.runs), "out": str(self.folder(stage)), "release": str(self.release)}

    def fingerprints(self) -> dict[str, str]:
        """Each stage's fingerprint as it would be now (a stage's depends on its inputs' fingerprints)."""
        out: dict[str, str] = {}
        for stage in self.stages:
            out[stage.name] = stage.fingerprint(self.smoke, out)
        return out

    def up_to_date(self, stage: Stage, fingerprint: str) -> bool:
        done = read_json(self.folder(stage) / "done.json")
        outputs = [self.folder(stage) / o.format(**self.places(stage)) for o in stage.config["outputs"]]
        return bool(done) and done.get("fingerprint") == fingerprint and all(p.exists() for p in outputs)

    def speed_for(self, stage: Stage, measure: bool = True) -> dict:
        """The options this machine runs ``stage`` fastest with (its config's ``speed`` list): measured once
        per machine and kind of stage (:meth:`probe`, ``train.speed --choose``) and kept in
        ``runs/speed.json``, so a resumed run keeps its choice; {} in smoke runs, for a stage that lists
        none, or where nothing is recorded and ``measure`` is False."""
        if self.smoke or not stage.speed:
            return {}
        path = self.runs / "speed.json"
        record = read_json(path) or {}
        key = f"{machine_key()} | {stage.speed_key()}"
        if key not in record and measure:
            record[key] = self.probe(stage)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1) + "\n")
        return {k: v for k, v in record.get(key, {}).items() if k in stage.speed}

    def _probe(self, stage: Stage) -> dict:
        """``python -m train.speed --choose`` on ``stage``: the fastest options it measured."""
        threads = str(stage.config["run"]["options"].get("--threads", 2))
        print(f"{stage.name}: timing how this machine trains it fastest (train.speed --choose)", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "train.speed", "--choose", "--models", stage.name, "--data",
                               str(self.data), "--threads", threads], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode:
            raise RuntimeError(f"train.speed --choose {stage.name} failed: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])[stage.name]

    def record(self) -> dict:
        """What the finished stages made, in graph order: each one's fingerprint, time (seconds over its
        attempts), device, when it finished, and the checkpoints it wrote (its folder's ``*.safetensors``).
        The release stage reads it (``{runs}/stages.json``) to name in each sidecar the stage that made it."""
        prints, out = self.fingerprints(), {}
        for stage in self.stages:
            if self.up_to_date(stage, prints[stage.name]):
                done = read_json(self.folder(stage) / "done.json") or {}
                out[stage.name] = {**{k: done.get(k) for k in ("fingerprint", "seconds", "attempts", "device", "time")},
                                   "checkpoints": sorted(p.stem for p in self.folder(stage).glob("*.safetensors"))}
        return out

    def plan(self, names: list[str]) -> list[dict]:
        prints = self.fingerprints()
        rows = []
        for stage in self.stages:
            folder = self.folder(stage)
            if self.up_to_date(stage, prints[stage.name]):
                state = "up to date"
            elif (folder / "started.json").is_file():
                started = read_json(folder / "started.json") or {}
                if started.get("fingerprint") != prints[stage.name]:
                    state = "stale: starts over"
                else:
                    state = "running now" if _alive(started.get("pid")) else "interrupted: resumes"
            else:
                state = "to run"
            minutes = stage.config["minutes"]
            done = read_json(folder / "done.json") or {}
            rows.append({"stage": stage.name, "state": state, "selected": stage.name in names,
                         "minutes": minutes.get(self.device, minutes.get("cpu")), "needs": stage.needs,
                         "took": _took(done)})
        return rows

    def run(self, names: list[str], dry: bool = False) -> int:
        prints = self.fingerprints()
        for stage in self.stages:
            if stage.name not in names:
                continue
            fingerprint, folder = prints[stage.name], self.folder(stage)
            if dry:  # with the options chosen for this machine where a choice is kept; none is measured
                argv = stage.argv(self.smoke, self.places(stage), self.torchrun, self.speed_for(stage, measure=False))
                for command in [*stage.setup(self.smoke, self.places(stage)), argv]:
                    print(f"{stage.name}: {' '.join(command[1:])}", file=sys.stderr)
                continue
            for need in stage.needs:
                if not self.up_to_date(self.by_name[need], prints[need]):
                    print(f"{stage.name}: its input {need} is not up to date (run it, or --from {need})", file=sys.stderr)
                    return 1
            if self.up_to_date(stage, fingerprint):
                print(f"{stage.name}: up to date", file=sys.stderr)
                continue
            speed = self.speed_for(stage)
            argv = stage.argv(self.smoke, self.places(stage), self.torchrun, speed)
            started = read_json(folder / "started.json")
            if started and started.get("fingerprint") != fingerprint:
                shutil.rmtree(folder)  # its config or inputs changed: what it left is stale
            folder.mkdir(parents=True, exist_ok=True)
            before = read_json(folder / "spent.json") or {"seconds": 0.0, "attempts": 0}  # earlier, interrupted attempts
            attempts = before["attempts"] + 1
            print(f"{stage.name}: {' '.join(argv[1:])}", file=sys.stderr)
            (folder / "started.json").write_text(json.dumps({"fingerprint": fingerprint, "argv": argv, "pid": os.getpid(),
                                                             "attempt": attempts,
                                                             "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            begin = time.time()
            (self.runs / "stages.json").write_text(json.dumps(self.record(), indent=1) + "\n")
            empty = self.runs / "no_checkpoints"
            empty.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   CHECKPOINTS_ENV: str(empty), **stage.env(self.places(stage))}

            def spent() -> float:  # this stage's time over all its attempts, kept while it runs
                seconds = round(before["seconds"] + time.time() - begin, 1)
                (folder / "spent.json").write_text(json.dumps({"seconds": seconds, "attempts": attempts}) + "\n")
                return seconds

            with (folder / "log.txt").open("a") as log:
                for command in [*stage.setup(self.smoke, self.places(stage)), argv]:
                    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                    while True:
                        try:
                            code = child.wait(timeout=HEARTBEAT)
                            break
                        except subprocess.TimeoutExpired:
                            spent()
                    if code:
                        break
            seconds = spent()
            if code:
                lines = [line for line in (folder / "log.txt").read_text(errors="replace").splitlines() if line.strip()]
                last = f": {lines[-1].strip()}" if lines else ""
                print(f"{stage.name}: failed (exit {code}){last}; see {folder / 'log.txt'}", file=sys.stderr)
                return code
            missing = [o for o in stage.config["outputs"] if not (folder / o.format(**self.places(stage))).exists()]
            if missing:
                print(f"{stage.name}: finished without writing {missing}", file=sys.stderr)
                return 1
            (folder / "done.json").write_text(json.dumps({"fingerprint": fingerprint, "seconds": seconds, "attempts": attempts,
                                                          "device": machine(), "torchrun": self.torchrun
                                                          if stage.config.get("distributed") else None, "smoke": self.smoke,
                                                          "speed": speed or None,
                                                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            print(f"{stage.name}: done in {seconds:.0f} s", file=sys.stderr)
        return 0


def _took(done: dict) -> str:
    """How long a finished stage took, on what, in how many attempts."""
    if "seconds" not in done:
        return ""
    tries = done.get("attempts", 1)
    return f"{done['seconds'] / 60:.1f} min on {done.get('device', '?')}" + (f", {tries} tries" if tries > 1 else "")


def _alive(pid: int | None) -> bool:
    """Whether the reproduction that started a stage still runs (on this machine)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or b"train.reproduce" in cmdline.read_bytes()


def machine_key() -> str:
    """This machine, as what trains fastest on it depends on it: the GPU, else the CPU model, its cores
    and AMX; and torch's version."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores, {'AMX' if has_amx() else 'no AMX'}, torch {torch.__version__}"


def machine() -> str:
    """What the stages ran on: the GPU's name, else the CPU's core count."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores)"


def select(stages: list[str], only: list[str] | None, start: str | None) -> list[str]:
    if only:
        unknown = [s for s in only if s not in stages]
        if unknown:
            raise SystemExit(f"unknown stage(s) {unknown}; stages: {', '.join(stages)}")
        return list(only)
    if start:
        if start not in stages:
            raise SystemExit(f"unknown stage {start!r}; stages: {', '.join(stages)}")
        return stages[stages.index(start):]
    return list(stages)


RUNS_ENV = "DIGIT_DEMO_RUNS"
# The graph's state lives outside the work tree, like any tool's cache, so a fresh checkout finds it.
CACHE = Path("~/.cache/digit_demo/reproduce")


def default_runs() -> Path:
    """Where the graph keeps its stages: ``$DIGIT_DEMO_RUNS``, else ~/.cache/digit_demo/reproduce."""
    return Path(os.environ.get(RUNS_ENV) or CACHE).expanduser()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.reproduce", description=__doc__.split("\n\n")[0],
                                epilog="\n".join(__doc__.split("\n\n")[-1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--runs", type=Path, default=default_runs(),
                   help=f"the graph's state: each stage's outputs (default ${RUNS_ENV}, else {CACHE})")
    p.add_argument("--release-dir", type=Path, help="where the release stage writes (default: checkpoints/)")
    p.add_argument("--only", nargs="+", metavar="STAGE")
    p.add_argument("--from", dest="start", metavar="STAGE")
    p.add_argument("--plan", action="store_true", help="print the stages, their state and time estimates, and stop")
    p.add_argument("--dry-run", action="store_true", help="print the commands it would run")
    p.add_argument("--smoke", action="store_true", help="the whole graph on the fixture images, a step or two a stage")
    p.add_argument("--device", default="cpu", help="which estimates the plan shows (cpu or gpu)")
    p.add_argument("--nproc", type=int, default=1, help="processes per machine for the detector stages (torchrun, DDP)")
    p.add_argument("--torchrun", default="", help="more torchrun arguments for several machines, e.g. "
                   "'--nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint HOST:29500'")
    args = p.parse_args(argv)
    torchrun = None
    if args.nproc > 1 or args.torchrun:
        torchrun = ["--nproc_per_node", str(args.nproc), *args.torchrun.split()]
        if "--nnodes" not in torchrun:
            torchrun.insert(0, "--standalone")
    runs = args.runs.resolve()
    data = args.data
    if args.smoke:
        from .smoke import make_smoke_data

        data = make_smoke_data(runs / "smoke_data")
    release = (args.release_dir or (runs / "released" if args.smoke else ROOT / "checkpoints")).resolve()
    repro = Reproduction(runs, data.resolve(), release, args.smoke, args.device, torchrun=torchrun)
    names = select([s.name for s in repro.stages], args.only, args.start)
    if args.plan:
        rows = repro.plan(names)
        total = sum(r["minutes"] for r in rows if r["selected"] and r["state"] != "up to date")
        print(f"{'stage':18} {'state':22} {'est. min':>8}  {'took':24} needs")
        for r in rows:
            mark = "" if r["selected"] else " (not selected)"
            print(f"{r['stage']:18} {r['state'] + mark:22} {r['minutes']:>8}  {r['took']:24} {', '.join(r['needs'])}")
        print(f"left to run: about {total / 60:.1f} h on {args.device}")
        done = sum(r["state"] == "up to date" for r in rows)
        print(f"state: {runs} ({done} of {len(rows)} stages done{'' if runs.is_dir() else '; not there yet: a run starts over'})")
        for stage in repro.stages:
            chosen = repro.speed_for(stage, measure=False)
            if chosen:
                shown = " ".join((k if v else f"no {k}") if isinstance(v, bool) else f"{k} {v}" for k, v in chosen.items())
                print(f"{stage.name}: runs here with {shown} (chosen by train.speed, kept in {runs / 'speed.json'})")
        if args.device == "cpu" and not has_amx():
            print(NO_AMX, file=sys.stderr)
        return 0
    return repro.run(names, args.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
