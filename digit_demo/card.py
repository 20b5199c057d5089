"""The model card (``checkpoints/README.md``), generated from the checkpoints' sidecars."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import CHECKPOINT_DIR, DEFAULT_MODEL, available

HEADER = """# Shipped checkpoints

Generated from the JSON sidecars by `python -m digit_demo models --write-card`; do not edit by hand.
Every model is a torchvision Faster R-CNN trained **from scratch** (no pretrained weights) on the SVHN
photos in `../shared/data/svhn` (non-commercial licence), 11 classes (background + digits 0-9,
`category_id = digit + 1`). Weights are fp16 safetensors; they run in fp32. Metrics are measured on the
300 `valid` images (exact SVHN labels) at the checkpoint's chosen threshold.

| name | architecture | input (short/long side) | valid mAP | AP50 | whole-number accuracy | threshold | epochs | trained on |
|---|---|---|---|---|---|---|---|---|
"""


def card_rows(directory: Path = CHECKPOINT_DIR) -> list[dict]:
    return [json.loads((directory / f"{n}.json").read_text()) for n in available(directory)]


def write_model_card(directory: Path = CHECKPOINT_DIR) -> Path:
    lines = [HEADER]
    notes = []
    for meta in card_rows(directory):
        v = meta.get("metrics", {}).get("valid", {})
        cfg = meta["config"]
        tr = meta.get("training", {})
        name = meta["name"] + (" (default)" if meta["name"] == DEFAULT_MODEL else "")
        lines.append(
            f"| {name} | `{meta['architecture']}` | {cfg['min_size']}/{cfg['max_size']} | {v.get('mAP', float('nan')):.3f} "
            f"| {v.get('AP50', float('nan')):.3f} | {v.get('accuracy', float('nan')):.3f} | {meta.get('threshold', 0.5):.2f} "
            f"| {tr.get('epochs_run', '?')} | {meta.get('device', '?')} |\n"
        )
        if meta.get("note"):
            notes.append(f"- **{meta['name']}**: {meta['note']}\n")
        rec = meta.get("recipe")
        if rec:
            notes.append(f"- **{meta['name']}** recipe: `{json.dumps(rec)}`; data: `{json.dumps(meta.get('data', {}))}`\n")
    out = directory / "README.md"
    out.write_text("".join(lines) + ("\n" + "".join(notes) if notes else ""))
    return out
