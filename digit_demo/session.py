"""Per-visitor reading session: the pipeline's raw readings kept, re-thresholded on demand.

The Gradio app keeps a :class:`Session` in ``gr.State``; moving the threshold calls
:meth:`Session.render`, which never runs a model.
"""
from __future__ import annotations

import functools
import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from .draw import DETAIL_SIDE, OVERVIEW_SIDE, draw_detections, draw_regions, shrunk
from .io import image_id_for, write_pred_csv, write_pred_json
from .pipeline import Reading
from .types import HouseNumber


@dataclass
class Picture:
    """What is kept of a read image to draw it again at any threshold, instead of the decoded image: each
    region's crop and, where numbers were located, the photo, each shrunk to the size it is drawn at
    (:func:`digit_demo.draw.shrunk`), with its scale: a 12-megapixel photo (36 MB decoded) keeps a 3.7 MB
    overview and its regions' crops."""

    crops: dict[tuple[int, int, int, int], tuple[Image.Image, float]]
    overview: tuple[Image.Image, float] | None = None

    @classmethod
    def of(cls, reading: Reading) -> "Picture | None":
        """The picture of ``reading``'s decoded image; None where it was not read or not kept."""
        if reading.error or reading.image is None:
            return None
        crops = {tuple(g.crop): shrunk(reading.image.crop(g.crop), DETAIL_SIDE) for g in reading.regions}
        return cls(crops, shrunk(reading.image, OVERVIEW_SIDE) if reading.located else None)


@dataclass
class Rendered:
    """One image's reading at a threshold: its HW2 ``image_id``, the number and the drawn digits
    (``annotated``: the whole crop, or in a whole photo the most confident number's region zoomed in);
    for a whole photo, :attr:`whole` draws the photo with every located number marked."""

    reading: Reading
    image_id: int
    number: HouseNumber
    annotated: Image.Image
    threshold: float
    picture: Picture | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.reading.name

    @functools.cached_property
    def whole(self) -> Image.Image | None:
        """The photo with every located number marked (None for an image read whole), drawn when
        first asked for: the page shows one image's, however many were read."""
        return draw_overview(self.reading, self.threshold, self.picture)


@dataclass
class Session:
    """What a visitor has read: the configuration's key, each image's reading, what drawing needs of its
    image (``pictures``: the decoded images are not kept, :meth:`keep`) and the messages for the images
    that could not be read."""

    key: str = ""
    readings: list[Reading] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pictures: list[Picture | None] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.readings and not self.pictures:
            self.keep(self.readings)

    def keep(self, readings: list[Reading]) -> None:
        """Keep ``readings`` without their decoded images, and each one's :class:`Picture`."""
        self.pictures = [Picture.of(r) for r in readings]
        self.readings = [replace(r, image=None) for r in readings]

    def render(self, threshold: float) -> list[Rendered]:
        """The readable images' numbers at ``threshold``, drawn."""
        out = []
        for k, (r, picture) in enumerate(zip(self.readings, self.pictures), 1):
            drawn = draw_number(r, threshold, picture)
            if drawn is not None:
                out.append(Rendered(r, image_id_for(Path(r.name), k), *drawn, threshold, picture))
        return out


def draw_number(reading: Reading, threshold: float, picture: Picture | None = None) -> tuple[HouseNumber, Image.Image] | None:
    """A reading's number at ``threshold`` and its most confident region with the digits boxed (an
    image read whole: the image), drawn from ``picture`` (default: the reading's decoded image); None
    where the image was not read or not kept."""
    picture = picture or Picture.of(reading)
    if picture is None or reading.error or not reading.regions:
        return None
    region, number = reading.numbers(threshold)[0]
    crop, scale = picture.crops[tuple(region.crop)]
    x1, y1 = region.crop[:2]
    return number, draw_detections(crop, number.digits.shifted(-x1, -y1), box_scale=scale)


def draw_overview(reading: Reading, threshold: float, picture: Picture | None = None) -> Image.Image | None:
    """Where numbers were located in a whole photo, the photo with every one marked with the number
    read there at ``threshold``, drawn from ``picture`` (default: the reading's decoded image); else (or
    where the image was not kept) None."""
    if reading.error or not reading.located:
        return None
    picture = picture or Picture.of(reading)
    if picture is None or picture.overview is None:
        return None
    photo, scale = picture.overview
    found = reading.numbers(threshold)
    return draw_regions(photo, [g.box for g, _ in found], [n.text for _, n in found], box_scale=scale)


def save_images(rendered: list[Rendered], folder: str | Path) -> list[Path]:
    """Each rendered image's drawn digits written once into ``folder`` as JPEG (quality 90: about 18x
    faster to write than PNG and 5x smaller, the boxes and labels as legible), for the page to show
    and the zip to hold."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, r in enumerate(rendered):
        out.append(folder / f"{k:03d}_{Path(r.name).stem}_annotated.jpg")
        r.annotated.save(out[-1], "JPEG", quality=90)
    return out


def write_downloads(rendered: list[Rendered], threshold: float, folder: str | Path | None = None,
                    images: list[Path] | None = None) -> list[Path]:
    """``pred.json``, ``pred.csv`` and ``annotated.zip`` for the readings, in ``folder`` (default: a
    fresh one); the zip holds ``images`` (each reading's drawn digits, default: written by
    :func:`save_images`) without encoding them again."""
    folder = Path(folder or tempfile.mkdtemp(prefix="digits_"))
    folder.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else save_images(rendered, folder / "images")
    pj = write_pred_json(folder / "pred.json", {r.image_id: r.reading.kept(threshold) for r in rendered})
    pc = write_pred_csv(folder / "pred.csv", {r.image_id: r.number.label for r in rendered})
    zp = folder / "annotated.zip"
    with zipfile.ZipFile(zp, "w", zipfile.ZIP_STORED) as z:
        for r, path in zip(rendered, images):
            z.write(path, f"{Path(r.name).stem}_annotated{Path(path).suffix}")
    return [pj, pc, zp]
