"""The model card (``checkpoints/README.md``), generated from the checkpoints' sidecars."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import CHECKPOINT_DIR, DEFAULT_MODEL, available, measured, read_sidecar
from .models import ModelConfig

HEADER = """# Shipped checkpoints

Generated from the JSON sidecars by the release step (`python -m digit_demo release`, or
`python -m digit_demo models --write-card` for the card alone); do not edit by hand.

**Intended use.** Reading house numbers from photos where the number fills most of the frame (SVHN-style
crops: a door plate, a mailbox, a cropped facade), in the `digit_demo` app, CLI and library, on a CPU,
offline. Research and demonstration only: the training data (SVHN) is licensed for non-commercial use.

**Limitations.** By default the numbers in a whole photo are found by PP-OCR's text detector (inside the
`rapidocr` wheel, not trained here), unless the readers below, reading a small photo whole, are sure of a
number filling it;
the CNN locator (below) learned from, and was measured on, synthetic scenes (SVHN crops pasted into photos),
not real street photos, and finds numbers where PP-OCR finds no digit line; a vertical number is read top to
bottom (the whole-number reader reads its digits laid side by side, without the proposer); digits other than
0-9 (letters such as "12A") are not read. {selection}

Every model is a torchvision Faster R-CNN trained **from scratch** (no pretrained weights) on the SVHN
photos in `../shared/data/svhn`, 11 classes (background + digits 0-9, `category_id = digit + 1`). Weights
are fp16 safetensors. They run in float32, or, where the CPU has Intel AMX (`DIGIT_DEMO_PRECISION=auto`,
the default), with the backbone, heads and readers' convolutions in bfloat16; "in fp32" gives the accuracy
and p50 of the same reading in float32 where it was measured apart. Metrics are measured on the 300 `valid`
images (exact SVHN labels) at the checkpoint's chosen threshold, on the shipped weights, by `benchmark.py`
(which also gives the CPU latency: batch 1, 2 threads). Input sizes list the short sides used in
(multi-scale) training; inference uses the last one, or the size after the arrow, chosen by
`python -m train.input_size` (on {sizes_on}). Every detector runs with the second-stage digit reader (below) unless told
not to; "detector only" is the accuracy without it, "multi-scale" the accuracy (with the reader) when each
photo is also read at a 1.15x larger input size (`--multi-scale`, about twice the time).

| name | architecture | input (short/long side) | valid mAP | AP50 | whole-number accuracy | detector only | multi-scale | threshold | p50 ms | in fp32 | epochs | training |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def card_rows(directory: Path = CHECKPOINT_DIR) -> list[dict]:
    return [read_sidecar(directory / f"{n}.safetensors") for n in available(directory)]


def _chain(meta: dict) -> list[dict]:
    """A checkpoint's training stages, oldest first (each fine-tuned stage names its parent in ``recipe.init_from``)."""
    stages = []
    while meta:
        stages.append(meta)
        meta = meta.get("recipe", {}).get("init_from")
    return stages[::-1]


def _device(stage: dict) -> str:
    return stage.get("training", {}).get("device") or stage.get("device_name") or "?"


def _epochs(meta: dict) -> str:
    """Epochs run, with a fine-tuned checkpoint's parent epochs first: '5 + 7'."""
    return " + ".join(str(st.get("training", {}).get("epochs_run", "?")) for st in _chain(meta))


def _stages(meta: dict) -> str:
    """One indented line per training stage, oldest first: epochs, device, recipe, validation result."""
    lines = []
    for i, st in enumerate(_chain(meta), 1):
        tr, rec, m = st.get("training", {}), st.get("recipe", {}), measured(st)
        # each stage as its trainer scored its epochs: the detector alone, on the split that chose them
        split, v = next(((k, m[k]) for k in ("tune", "valid_detector_only", "valid") if m.get(k)), ("valid", {}))
        config = f", `{rec['config']}`" if rec.get("config") else ""
        lines.append(f"  {i}. {tr.get('epochs_run', '?')} epochs on {_device(st)}: "
                     f"batch {rec.get('batch_size', '?')}, lr {rec.get('lr', '?')} {rec.get('lr_schedule', '')}{config}; "
                     f"{split.split('_')[0]} accuracy {v.get('accuracy', float('nan')):.3f}, "
                     f"mAP {v.get('mAP', float('nan')):.3f} (detector alone)\n")
    return "".join(lines)


def _ms(value: float | None) -> str:
    return f"{value:.0f}" if value else "-"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def training_summary(meta: dict) -> str:
    """Epochs, time and speed per device over every training stage, oldest first:
    'cpu 20 ep, ≥3.3 h, 7.74 img/s; NVIDIA H200 12 ep, 9 min, 140 img/s' (≥: a stage did not log its time)."""
    per: dict[str, dict] = {}
    for st in _chain(meta):
        tr = st.get("training", {})
        d = per.setdefault(_device(st), {"epochs": 0, "runs": [], "untimed": False})
        d["epochs"] += tr.get("epochs_run", 0)
        if tr.get("train_seconds") and tr.get("images_per_s"):
            d["runs"].append((tr["images_per_s"], tr["train_seconds"]))
        else:
            d["untimed"] = True
    parts = []
    for device, d in per.items():
        text = f"{device} {d['epochs']} ep"
        seconds = sum(s for _, s in d["runs"])
        if seconds:
            text += f", {'≥' if d['untimed'] else ''}{_duration(seconds)}, {sum(v * s for v, s in d['runs']) / seconds:.3g} img/s"
        parts.append(text)
    return "; ".join(parts)


def _input(cfg: dict) -> str:
    """'[80, 96]/256', with the inference size when it differs: '[80, 96]/256 → 128/341'."""
    trained = f"{cfg['min_size']}/{cfg['max_size']}"
    last = ModelConfig.from_dict(cfg).train_size
    if not cfg.get("test_size") or (cfg["test_size"], cfg["test_max_size"]) == (last, cfg["max_size"]):
        return trained
    return f"{trained} → {cfg['test_size']}/{cfg['test_max_size']}"


def _accuracy(meta: dict, metrics: str) -> str:
    v = measured(meta, metrics)
    return f"{v['accuracy']:.3f}" if v else "-"


def _in_fp32(meta: dict) -> str:
    """'0.857, 52 ms': accuracy and p50 of the reading in float32, where the benchmark measured it apart."""
    timing = (meta.get("benchmark", {}).get("fp32") or {}).get("p50_ms")
    return f"{_accuracy(meta, 'valid_fp32')}, {_ms(timing)} ms" if timing else "-"


def write_model_card(directory: Path = CHECKPOINT_DIR) -> Path:
    lines = [HEADER.format(**_selection(directory))]
    notes = []
    for meta in card_rows(directory):
        v = measured(meta, "valid")
        cfg = meta["config"]
        name = meta["name"] + (" (default)" if meta["name"] == DEFAULT_MODEL else "")
        lines.append(
            f"| {name} | `{meta['architecture']}` | {_input(cfg)} | {v.get('mAP', float('nan')):.3f} "
            f"| {v.get('AP50', float('nan')):.3f} | {v.get('accuracy', float('nan')):.3f} "
            f"| {_accuracy(meta, 'valid_detector_only')} | {_accuracy(meta, 'valid_multi_scale')} | {meta.get('threshold', 0.5):.2f} "
            f"| {_ms(meta.get('benchmark', {}).get('p50_ms'))} | {_in_fp32(meta)} | {_epochs(meta)} | {training_summary(meta)} |\n"
        )
        if meta.get("note"):
            notes.append(f"- **{meta['name']}**: {meta['note']}\n")
        for extra in meta.get("data", {}).get("extra", []):
            notes.append(f"- **{meta['name']}** also trained on {extra['count']} `{extra['images']}/` images labelled by "
                         "`python -m train.resolve`: real SVHN boxes, each image's record picked among its same-size "
                         "candidates by a trained detector (pseudo-labels, self-training)\n")
        for synth in meta.get("data", {}).get("synthetic", []):
            notes.append(f"- **{meta['name']}** also trained on {synth['count']} synthetic house numbers "
                         f"(`python -m train.synth`: the installed fonts on real backgrounds, boxes measured on the ink)\n")
        rec = meta.get("recipe")
        if rec:
            last = {k: v for k, v in rec.items() if k != "init_from"}
            notes.append(f"- **{meta['name']}** recipe: `{json.dumps(last)}`; data: `{json.dumps(meta.get('data', {}))}`\n")
            if "init_from" in rec:
                notes.append(f"- **{meta['name']}** training stages, each fine-tuning the one before:\n{_stages(meta)}")
    out = directory / "README.md"
    out.write_text("".join(lines) + ("\n" + "".join(notes) if notes else "") + _reader_section(directory)
                   + _number_reader_section(directory) + _text_section(directory) + _locator_section(directory)
                   + _reproduction_section(directory))
    return out


def _reproduction_section(directory: Path) -> str:
    """The stages of the reproduction that made what ships (``reproduction.json``, written by the
    release stage): time, device and when each finished, and which checkpoints each made; or, without
    it, that the shipped files came from hand-run stages."""
    path = directory / "reproduction.json"
    if not path.is_file():
        return ("\n## How these were made\n\nBy hand-run stages (each sidecar's recipe), not by one run of "
                "`python -m train.reproduce`.\n")
    stages = json.loads(path.read_text())
    made = {}
    for weights in directory.glob("*.safetensors"):
        side = weights.with_suffix(".json")
        by = json.loads(side.read_text()).get("made_by") if side.is_file() else None
        if isinstance(by, dict) and by.get("stage"):
            made.setdefault(by["stage"], []).append(weights.stem)
    rows = [f"| {name} | {_duration(st.get('seconds') or 0)} | {st.get('device', '?')} | {st.get('time', '?')} "
            f"| {', '.join(sorted(made.get(name, []))) or '-'} |\n" for name, st in stages.items()]
    total = sum(st.get("seconds") or 0 for st in stages.values())
    return ("\n## How these were made\n\nOne run of `python -m train.reproduce` (each sidecar's `made_by` names its "
            f"stage and fingerprint); {_duration(total)} in all.\n\n"
            "| stage | took | device | finished | ships |\n|---|---|---|---|---|\n" + "".join(rows))


def _selection(directory: Path) -> dict[str, str]:
    """What chose the shipped constants, as the sidecars record it: the reproduction's tuning split, or `valid`."""
    try:
        meta = read_sidecar(directory / f"{DEFAULT_MODEL}.safetensors")
    except (OSError, ValueError):
        meta = {}
    if measured(meta, "valid").get("threshold_chosen_on") == "tune":
        return {"selection": "Every threshold, margin, input size and epoch was chosen on a tuning split carved from "
                             "`train` (300 exact-tier images, `python -m train.splits`); the 300 `valid` images below only "
                             "report, at the thresholds chosen there.",
                "sizes_on": "the tuning split"}
    return {"selection": "Every threshold, margin, input size and fusion weight was chosen on the same 300 `valid` images "
                         "the metrics below report, so they are slightly optimistic for photos no one tuned on.",
            "sizes_on": "`valid`"}


def reader_sidecar(directory: Path = CHECKPOINT_DIR, name: str | None = None) -> dict | None:
    """The sidecar of a shipped second stage (default: the digit reader), or None where it is not shipped."""
    from .reader import DEFAULT_READER

    side = directory / f"{name or DEFAULT_READER}.json"
    return read_sidecar(side) if side.is_file() else None


def _measured_on(meta: dict) -> str:
    """Which split a second-stage reader's trainer validated on (its ``valid_*`` metrics, and the constants it
    chose there): `valid`, or the reproduction's tuning split."""
    split = Path(str(meta.get("data", {}).get("valid", "valid.json"))).name
    return "`valid`" if split == "valid.json" else f"the tuning split (`{split}`)"


def _sequence_training(meta: dict) -> str:
    """How a whole-number reader or proposer was trained, from its sidecar."""
    tr, data = meta.get("training", {}), meta.get("data", {})
    extra = "".join(f" + {e['count']} resolved `{e['images']}/` images" for e in data.get("extra", []))
    own = data.get("self_labelled")
    if own:
        extra += (f" + {own['count']} `{own['images']}/` photos labelled with the numbers `{own['detector']}` reads "
                  f"with confidence ≥ {own['min_confidence']:g} (self-training)")
    return (f"Alone, on crops around the true boxes of {_measured_on(meta)}, it reads "
            f"{meta['metrics']['valid_number_accuracy_true_boxes']:.3f} of the numbers. Trained on "
            f"`train`{extra}: {tr.get('epochs_run', '?')} epochs on {tr.get('device', '?')}, "
            f"{_duration(tr.get('train_seconds', 0))} (`python -m train.number_reader`); recipe "
            f"`{json.dumps(meta.get('recipe', {}))}`.")


def _number_reader_section(directory: Path) -> str:
    """The whole-number reader's entry (and its proposer's), if one is shipped."""
    from .number_reader import DEFAULT_NUMBER_READER, DEFAULT_PROPOSER, LINE_MARGIN, REGION_THRESHOLD

    meta = reader_sidecar(directory, DEFAULT_NUMBER_READER)
    if meta is None:
        return ""
    cfg, tuned = meta["config"], meta.get("tuned", {})
    region, margin = tuned.get("region_threshold", REGION_THRESHOLD), tuned.get("line_margin", LINE_MARGIN)
    proposer = reader_sidecar(directory, DEFAULT_PROPOSER)
    proposal = "" if proposer is None else (
        f"\n\nIts proposer (`{proposer['name']}`) is a second CRNN (the same GRU and CTC head) whose CNN is the digit reader's "
        f"(backbone `{proposer['config'].get('backbone')}`, started from `{proposer['recipe'].get('init_reader')}`); the "
        "number it reads joins the alternatives, each digit on the detected box it falls on (or placed where it was "
        "read); it is asked only where the reader's own greedy reading differs from the number the detections read. "
        f"{_sequence_training(proposer)}")
    return (f"\n## Whole-number reader (`{meta['name']}`)\n\n"
            f"A CRNN (`{meta['architecture']}`: CNN width {cfg['width']}, bidirectional GRU {cfg['hidden']}, CTC) that "
            f"reads the whole number from a {cfg['height']} x {cfg['crop_width']} crop around the digits found at "
            f"threshold {region:g}. The numbers read at the other thresholds are the alternatives; one it "
            f"finds more likely than the chosen threshold's by {margin:g} nats replaces it "
            "(`digit_demo.assemble.assemble`), so it judges how many digits a number has, and which. "
            f"{_sequence_training(meta)}{proposal}\n")


def _reader_section(directory: Path) -> str:
    """The second-stage digit reader's entry, if one is shipped."""
    meta = reader_sidecar(directory)
    if meta is None:
        return ""
    m, tr, cfg = measured(meta), meta.get("training", {}), meta["config"]
    extra = "".join(f" + {e['count']} resolved `{e['images']}/` images" for e in meta.get("data", {}).get("extra", []))
    return (f"\n## Second-stage digit reader (`{meta['name']}`)\n\n"
            f"A small CNN (`{meta['architecture']}`, width {cfg['width']}) that reads each spot a detector found from a "
            f"{cfg['crop']} x {cfg['crop']} crop of the original photo ({cfg['context']} x the box's longer side): digit "
            f"0-9 or background. {_scoring(meta)} Validation ({_measured_on(meta)}, ground-truth boxes): digit accuracy "
            f"{m.get('valid_digit_accuracy', float('nan')):.3f}, background crops rejected "
            f"{m.get('valid_background_accuracy', float('nan')):.3f}.{_box_head(meta)} Trained from scratch on `train`{extra}{_mined(meta)}: "
            f"{tr.get('epochs_run', '?')} epochs on {tr.get('device', '?')}, {_duration(tr.get('train_seconds', 0))} "
            f"(`python -m train.reader`); recipe `{json.dumps(meta.get('recipe', {}))}`.\n")


def _scoring(meta: dict) -> str:
    """How :func:`digit_demo.reader.refine` scores a spot with this reader, and the ``verify`` sweep that chose it."""
    v = float(meta["config"].get("verify", 0.0))
    text = ("A spot's score is the detector's presence there times the reader's digit probability" if not v else
            f"A spot's score is presence^{1 - v:g} x (the reader's probability that a digit is there)^{v:g} x its "
            "probability of each digit") + " (`digit_demo.reader.refine`)."
    sweep = meta.get("verify_sweep")
    if sweep:
        tried = ", ".join(f"{r['verify']:g}: {r['accuracy']:.3f}" for r in sorted(sweep["rows"], key=lambda r: r["verify"]))
        text += (f" `verify` = {v:g} (how far the reader's own presence replaces the detector's) was chosen on {_measured_on(meta)} "
                 f"with `{sweep['detector']}`; whole-number accuracy per value: {tried}.")
    return text


def _mined(meta: dict) -> str:
    hn = meta.get("data", {}).get("hard_negatives")
    if not hn:
        return ""
    return (f", plus the {hn['train_spots']} spots `{hn['detector']}` finds on those images "
            f"({hn['train_false_boxes']} of them false boxes, taught as background)")


def _box_head(meta: dict) -> str:
    from .reader import BOX_BLEND

    m = measured(meta)
    if not meta["config"].get("box_head") or "valid_refined_box_iou" not in m:
        return ""
    blend = meta.get("tuned", {}).get("box_blend", BOX_BLEND)
    return (f" Its box head also says where the digit sits in the crop, and each spot's box moves {blend:.0%} of the "
            f"way there: on {_measured_on(meta)}'s "
            f"digit boxes jittered as a detector's are, mean IoU with the true box {m['valid_jittered_box_iou']:.3f} "
            f"→ {m['valid_refined_box_iou']:.3f}.")


def model_label(name: str, directory: Path = CHECKPOINT_DIR, reader: bool = True) -> str:
    """'name · acc 0.85 · mAP 0.41 · 45 ms' from the sidecar's measured numbers, with the second-stage readers
    or (``reader=False``, where measured) for the detector alone."""
    meta = read_sidecar(directory / f"{name}.safetensors")
    metrics, bench = measured(meta), meta.get("benchmark", {})
    alone = not reader and "valid_detector_only" in metrics
    v = metrics.get("valid_detector_only" if alone else "valid", {})
    p50 = bench.get("detector_only", {}).get("p50_ms") if alone else bench.get("p50_ms")
    parts = [name]
    if v:
        parts += [f"acc {v['accuracy']:.2f}", f"mAP {v['mAP']:.2f}"]
    if p50:
        parts.append(f"{p50:.0f} ms")
    return " · ".join(parts)


def _text_section(directory: Path) -> str:
    """The PP-OCR locate stage's entry (``ppocr.json``): the package, each setting and where it was
    chosen, and the tuning rows behind what a release chose."""
    from .ocr import SIDECAR

    side = directory / SIDECAR
    if not side.is_file():
        return ""
    meta = json.loads(side.read_text())
    cfg, tuned = meta.get("config", {}), dict(meta.get("tuned", {}))
    chosen = tuned.pop("chosen_on", {})
    rows = "".join(f"| `{k}` | {json.dumps(v)} | {chosen.get(k, '?') if isinstance(chosen, dict) else chosen} |\n"
                   for k, v in tuned.items())
    tried = "".join(f"\n- `{k}` per value tried: " + ", ".join(f"{r.get(k)}: {r['read']} of {r['of']}" for r in trials) + "."
                    for k, trials in meta.get("tuning", {}).items())
    return (f"\n## Text lines (`{SIDECAR}`)\n\n"
            f"By default PP-OCR finds the lines of text that hold digits, and its recognizer's reading of each is weighed "
            f"against the readers' (`{cfg.get('package')}` {cfg.get('version') or ''}: {cfg.get('models', 'ONNX models')}, "
            f"not trained here; `digit_demo.ocr.TextSettings` says what each setting does).\n\n"
            f"| setting | value | chosen on |\n|---|---|---|\n{rows}{tried}{chr(10) if tried else ''}")


def _locator_section(directory: Path) -> str:
    """The locate stage's entry, if a locator is shipped."""
    from .locator import DEFAULT_LOCATOR, MIN_PHOTO_SIDE

    meta = reader_sidecar(directory, DEFAULT_LOCATOR)
    if meta is None:
        return ""
    cfg, tuned, tr = meta["config"], meta.get("tuned", {}), meta.get("training", {})
    tune = measured(meta, "tune_scenes")
    return (f"\n## Locator (`{meta['name']}`)\n\n"
            f"A small fully convolutional network (`{meta['architecture']}`, width {cfg['width']}) that finds house "
            f"numbers in whole photos: it reads the photo at {cfg['input_side']} px on its long side (a JPEG decoded at a "
            f"reduced scale) and predicts, on a grid of stride {cfg['stride']}, each number region's centre and size "
            f"(the union of its digits' boxes). Each region scoring at least {tuned.get('min_score', 0.3):g} is cropped "
            f"from the full-resolution photo, padded by {tuned.get('pad', [0.5, 0.25])[0]:g} / "
            f"{tuned.get('pad', [0.5, 0.25])[1]:g} of its height sideways / above and below, and read by the stages "
            f"above; photos under {MIN_PHOTO_SIDE} px on their short side are read whole, as crops. Trained from scratch "
            f"on synthetic scenes (`python -m train.locator`: `train` crops pasted into the training backgrounds of "
            f"`train.scenes`, {tr.get('steps_run', '?')} steps, {_duration(tr.get('train_seconds', 0))} on "
            f"{tr.get('device', '?')}). The checkpoint was chosen on tuning scenes (held-back `train` crops, never pasted in "
            f"training): at score {tune.get('min_score', float('nan')):g} it finds {tune.get('recall', float('nan')):.3f} "
            f"of the numbers (IoU >= 0.5) with precision {tune.get('precision', float('nan')):.3f}. How its regions are "
            f"read was chosen by what the default pipeline reads on {meta.get('locate_tuning', {}).get('scenes', '?')} "
            f"full-size tuning scenes: the score threshold {tuned.get('min_score', 0.3):g}, the padding above"
            f" and regions ranked by their reading's confidence x the locator's score^{tuned.get('rank_power', 0.0):g} "
            f"(accuracy per option: {_tuning(meta)}). Recipe `{json.dumps(meta.get('recipe', {}))}`.\n")


def _tuning(meta: dict) -> str:
    rows = meta.get("locate_tuning", {}).get("rows", [])
    def option(r: dict) -> str:
        text = f"score {r['min_score']:g}{' + fallback' if r.get('fallback_score') is not None else ''}"
        if "pad_x" in r:
            text += f", pad {r['pad_x']:g}/{r.get('pad_y', 0.25):g}{', re-read' if r.get('widen') else ''}, power {r.get('rank_power', 0):g}"
        return f"{text}: {r['accuracy']:.3f}"

    return "; ".join(option(r) for r in rows) or "not measured"
