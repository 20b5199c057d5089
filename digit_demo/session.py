"""Per-user reading session: raw detections computed once, re-thresholded on demand.

The Gradio app keeps a :class:`Session` in ``gr.State``; moving the threshold calls
:meth:`Session.render`, which never runs a model.
"""
from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .assemble import Detections, HouseNumber, assemble
from .draw import draw_detections
from .ensemble import DEFAULT_FUSION
from .io import write_pred_csv, write_pred_json


@dataclass
class Item:
    name: str
    image_id: int
    image: Image.Image
    raw: Detections


@dataclass
class Reading:
    item: Item
    number: HouseNumber
    annotated: Image.Image


@dataclass
class Session:
    models: tuple[str, ...] = ()
    fusion: str = DEFAULT_FUSION
    items: list[Item] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def render(self, threshold: float) -> list[Reading]:
        """Re-filter the cached detections at ``threshold`` and draw them."""
        out = []
        for item in self.items:
            number = assemble(item.raw, threshold)
            out.append(Reading(item, number, draw_detections(item.image, number.digits)))
        return out


def write_downloads(readings: list[Reading], threshold: float, folder: str | Path | None = None) -> list[Path]:
    """``pred.json``, ``pred.csv`` and ``annotated.zip`` for the readings, in a fresh folder."""
    folder = Path(folder or tempfile.mkdtemp(prefix="digits_"))
    folder.mkdir(parents=True, exist_ok=True)
    pj = write_pred_json(folder / "pred.json", {r.item.image_id: r.item.raw.above(threshold) for r in readings})
    pc = write_pred_csv(folder / "pred.csv", {r.item.image_id: r.number.label for r in readings})
    zp = folder / "annotated.zip"
    with zipfile.ZipFile(zp, "w", zipfile.ZIP_STORED) as z:
        for r in readings:
            buf = io.BytesIO()
            r.annotated.save(buf, "PNG", compress_level=1)
            z.writestr(f"{Path(r.item.name).stem}_annotated.png", buf.getvalue())
    return [pj, pc, zp]
