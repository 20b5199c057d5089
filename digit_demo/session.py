"""Per-visitor reading session: the pipeline's raw readings kept, re-thresholded on demand.

The Gradio app keeps a :class:`Session` in ``gr.State``; moving the threshold calls
:meth:`Session.render`, which never runs a model.
"""
from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .draw import draw_detections, draw_regions
from .io import image_id_for, write_pred_csv, write_pred_json
from .pipeline import Reading
from .types import HouseNumber


@dataclass
class Rendered:
    """One image's reading at a threshold: its HW2 ``image_id``, the number, the drawn digits
    (``annotated``: the whole crop, or in a whole photo the most confident number's region zoomed in)
    and, for a whole photo, the photo with every located number marked (``whole``)."""

    reading: Reading
    image_id: int
    number: HouseNumber
    annotated: Image.Image
    threshold: float
    whole: Image.Image | None = None

    @property
    def name(self) -> str:
        return self.reading.name


@dataclass
class Session:
    """What a visitor has read: the configuration's key, each image's reading (with its decoded image)
    and the messages for the images that could not be read."""

    key: str = ""
    readings: list[Reading] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def render(self, threshold: float) -> list[Rendered]:
        """The readable images' numbers at ``threshold``, drawn."""
        out = []
        for k, r in enumerate(self.readings, 1):
            drawn = annotate(r, threshold)
            if drawn is not None:
                out.append(Rendered(r, image_id_for(Path(r.name), k), *drawn[:2], threshold, drawn[2]))
        return out


def annotate(reading: Reading, threshold: float) -> tuple[HouseNumber, Image.Image, Image.Image | None] | None:
    """A reading at ``threshold`` drawn: its number, the most confident number's region with its digits
    boxed (an image read whole: the image) and, where numbers were located in a whole photo, the photo
    with every one marked (else None); None where the image was not read or not kept."""
    if reading.error or reading.image is None or not reading.regions:
        return None
    found = reading.numbers(threshold)
    region, number = found[0]
    x1, y1 = region.crop[:2]
    zoomed = draw_detections(reading.image.crop(region.crop), number.digits.shifted(-x1, -y1))
    if not reading.located:
        return number, zoomed, None
    return number, zoomed, draw_regions(reading.image, [g.box for g, _ in found], [n.text for _, n in found])


def save_images(rendered: list[Rendered], folder: str | Path) -> list[tuple[Path, Path | None]]:
    """Each rendered image written once into ``folder`` as JPEG (quality 90: about 20x faster to
    write than PNG and 5x smaller, the boxes and labels as legible), for the page to show and the zip
    to hold; (drawn digits, whole photo's overview or None) per image."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, r in enumerate(rendered):
        stem = f"{k:03d}_{Path(r.name).stem}"
        digits = folder / f"{stem}_annotated.jpg"
        r.annotated.save(digits, "JPEG", quality=90)
        whole = None
        if r.whole is not None:
            whole = folder / f"{stem}_photo.jpg"
            r.whole.save(whole, "JPEG", quality=90)
        out.append((digits, whole))
    return out


def write_downloads(rendered: list[Rendered], threshold: float, folder: str | Path | None = None,
                    images: list[Path] | None = None) -> list[Path]:
    """``pred.json``, ``pred.csv`` and ``annotated.zip`` for the readings, in ``folder`` (default: a
    fresh one); the zip holds ``images`` (each reading's drawn digits, default: written by
    :func:`save_images`) without encoding them again."""
    folder = Path(folder or tempfile.mkdtemp(prefix="digits_"))
    folder.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else [d for d, _ in save_images(rendered, folder / "images")]
    pj = write_pred_json(folder / "pred.json", {r.image_id: r.reading.kept(threshold) for r in rendered})
    pc = write_pred_csv(folder / "pred.csv", {r.image_id: r.number.label for r in rendered})
    zp = folder / "annotated.zip"
    with zipfile.ZipFile(zp, "w", zipfile.ZIP_STORED) as z:
        for r, path in zip(rendered, images):
            z.write(path, f"{Path(r.name).stem}_annotated{Path(path).suffix}")
    return [pj, pc, zp]
