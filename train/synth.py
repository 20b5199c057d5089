"""Synthetic house numbers: digit strings rendered with the installed fonts on crops of real photos.

SVHN is all the real data there is, so more data means made-up data. Two looks:

- SVHN's (:func:`render`, the default): one number of 1-4 digits (lengths drawn as often as in SVHN
  `train`), in one colour, on a plate of another colour or straight onto a crop of a background photo
  (the scene backgrounds of :mod:`train.scenes`, or any folder of photos), at the sizes SVHN's photos
  have (24-140 px tall, digits 35-85% of the height, 1.6-3.2 times as wide as tall);
- real photos' (:func:`render_real`, ``--real-style``): plaques with and without a border, painted on
  the wall, engraved, backlit, brass, one tile a digit; longer numbers; a letter suffix ("12A") or a
  word nearby that is drawn and not labelled; low light and glare.

Fonts: every TrueType and OpenType font under ``/usr/share/fonts`` that draws the digits and the suffix
letters (:func:`find_fonts`): the Debian packages ``fonts-dejavu`` and ``fonts-liberation`` and, for
many families (serif, sans, condensed, bold, rounded, monospace, comic, display), the rest of
:data:`FONT_PACKAGES` (214 fonts; ``python -m train.synth --install`` installs them with apt).

Each image is then blurred, shrunk and enlarged again, noised and JPEG-compressed. Each digit's box is
its own ink's bounding box, measured on the pixels it was drawn with, grown about its centre to SVHN's
convention (:data:`BOX_GROW`), so the labels are exact. Geometry (rotation, shear, perspective)
is left to the training augmentation (:mod:`train.presets`), which also draws it for real photos.

The images and an HW2 COCO file (``category_id`` = digit + 1, ``label_tier`` "synthetic") are written
to ``--out`` (:func:`set_paths`); every trainer reads them as more data with ``--synthetic OUT``. Every
draw comes from one seeded generator, so a seed, a count, the fonts and the backgrounds give the same
images.

    python -m train.synth --count 5000 --seed 0 --out runs/synth
    python -m train.synth --real-style --count 8000 --seed 0 --out runs/synth_real
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .scenes import open_background, random_crop

FONT_ROOT = Path("/usr/share/fonts")
# Debian's font packages the synthetic numbers are drawn in (``--install``): many families and weights
FONT_PACKAGES = ("fonts-dejavu", "fonts-liberation", "fonts-urw-base35", "fonts-freefont-ttf", "fonts-roboto-unhinted",
                 "fonts-open-sans", "fonts-cantarell", "fonts-linuxlibertine", "fonts-comic-neue", "fonts-noto-core",
                 "fonts-crosextra-carlito", "fonts-crosextra-caladea", "fonts-lato", "fonts-firacode", "fonts-hack",
                 "fonts-league-spartan", "fonts-bebas-neue", "fonts-b612", "fonts-ebgaramond")
LENGTHS = (1, 2, 3, 4)
LENGTH_P = (0.127, 0.507, 0.313, 0.053)  # SVHN train's numbers of 1-4 digits (5 are 4 in 6,469)
HEIGHT = (24, 140)  # image height, px (SVHN train: 5th-95th percentile 24-141)
DIGIT_SHARE = (0.35, 0.85)  # digit height / image height (SVHN: 0.30-0.85)
ASPECT = (1.6, 3.2)  # image width / height (SVHN: 1.8-3.1)
MIN_CONTRAST = 90  # least luminance difference (0-255) between the digits and what is behind them
# SVHN's boxes are larger than a digit's ink. The shipped detector's boxes are a median 1.18 x 1.16 (width x
# height) the ink boxes of 200 synthetic numbers, and 1.00 x 0.97 the labelled boxes of the tuning split's photos:
# labels are about 1.18 x 1.19 the ink.
BOX_GROW = (1.18, 1.19)


def find_fonts(root: Path = FONT_ROOT) -> list[Path]:
    """Every TrueType or OpenType font under ``root`` that draws all ten digits and the suffix letters,
    each its own glyph, sorted (math fonts and hairline weights left out)."""
    fonts = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf")):
        if any(w in path.name.lower() for w in ("math", "thin", "extralight", "ultralight", "hairline")):
            continue  # hairline weights vanish under a photo's blur at house-number sizes
        try:
            font = ImageFont.truetype(str(path), 32)
        except OSError:
            continue
        chars = "0123456789" + SUFFIX_LETTERS
        if len({bytes(font.getmask(c)) for c in chars}) == len(chars) and all(font.getbbox(str(d))[2] > font.getbbox(str(d))[0] for d in range(10)):
            fonts.append(path)  # each its own glyph: a font without them draws one missing-glyph box
    return fonts


@dataclass
class Synthetic:
    """One synthetic house number: the RGB image, xyxy digit boxes (left to right) and the digits; what
    was drawn beside them and not labelled: a letter ``suffix`` and a nearby ``word``."""

    image: Image.Image
    boxes: np.ndarray
    digits: np.ndarray
    suffix: str = ""
    word: str = ""

    @property
    def text(self) -> str:
        return "".join(str(int(d)) for d in self.digits)


def _luminance(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _contrasting(behind: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour at least MIN_CONTRAST brighter or darker than ``behind``, in whichever direction has room."""
    lum = _luminance(behind)
    for _ in range(50):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if abs(_luminance(colour) - lum) >= MIN_CONTRAST:
            return colour
    return (0, 0, 0) if lum > 127 else (255, 255, 255)


def _grown(box: list[float], width: int, height: int) -> list[float]:
    """An ink box grown by :data:`BOX_GROW` about its centre, inside the image."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) * BOX_GROW[0] / 2, (box[3] - box[1]) * BOX_GROW[1] / 2
    return [max(0.0, cx - hw), max(0.0, cy - hh), min(float(width), cx + hw), min(float(height), cy + hh)]


def _glyphs(text: str, font: ImageFont.FreeTypeFont, tracking: float, stroke: int):
    """Each digit's ink mask and where it goes: (mask, x, y) with x, y its top-left on a line."""
    out, pen = [], 0.0
    for ch in text:
        left, top, right, bottom = font.getbbox(ch, stroke_width=stroke)
        w, h = right - left + 2, bottom - top + 2
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((1 - left, 1 - top), ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
        out.append((mask, round(pen + left) - 1, top - 1))
        pen += font.getlength(ch) + tracking + 2 * stroke
    return out


def render(backgrounds: list[Image.Image], fonts: list[Path], rng: np.random.Generator, plate: float = 0.5,
           shadow: float = 0.2) -> Synthetic:
    """One synthetic house number (see the module docstring for what is drawn); ``plate`` and ``shadow``
    are how often the digits get a plate behind them and a drop shadow."""
    length = int(rng.choice(LENGTHS, p=LENGTH_P))
    digits = [int(rng.integers(1, 10))] + [int(d) for d in rng.integers(0, 10, length - 1)]
    text = "".join(map(str, digits))
    height = int(round(np.exp(rng.uniform(np.log(HEIGHT[0]), np.log(HEIGHT[1])))))
    digit_height = rng.uniform(*DIGIT_SHARE) * height
    font_path = fonts[int(rng.integers(len(fonts)))]
    probe = ImageFont.truetype(str(font_path), 100)
    ink = probe.getbbox("0")[3] - probe.getbbox("0")[1]  # a digit's ink height at size 100
    size = max(6, int(round(digit_height * 100 / ink)))
    font = ImageFont.truetype(str(font_path), size)
    stroke = int(rng.integers(1, max(2, size // 12) + 1)) if rng.random() < 0.15 else 0
    glyphs = _glyphs(text, font, rng.uniform(-0.04, 0.25) * size, stroke)
    x0 = min(x for _, x, _ in glyphs)
    line_w = max(x + m.width for m, x, _ in glyphs) - x0
    line_top = min(y for _, _, y in glyphs)
    line_h = max(y + m.height for m, _, y in glyphs) - line_top
    width = max(int(round(height * rng.uniform(*ASPECT))), int(line_w * rng.uniform(1.08, 1.35)))
    height = max(height, int(line_h * 1.1) + 2)

    canvas = random_crop(backgrounds[int(rng.integers(len(backgrounds)))], (width, height), rng, zoom=(1.0, 3.0))
    canvas = canvas.convert("RGB")

    left = int(rng.integers(0, width - line_w + 1)) - x0
    top = int(rng.integers(0, height - line_h + 1)) - line_top
    draw = ImageDraw.Draw(canvas)
    if rng.random() < plate:
        pad_x, pad_y = rng.uniform(0.1, 0.5) * line_h, rng.uniform(0.08, 0.3) * line_h
        plate = (max(0, left + x0 - pad_x), max(0, top + line_top - pad_y),
                 min(width - 1, left + x0 + line_w + pad_x), min(height - 1, top + line_top + line_h + pad_y))
        behind = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rounded_rectangle(plate, radius=rng.uniform(0, 0.3) * line_h, fill=behind)
    else:
        region = canvas.crop((left + x0, top + line_top, left + x0 + line_w, top + line_top + line_h))
        behind = tuple(int(c) for c in np.asarray(region).reshape(-1, 3).mean(0))
    colour = _contrasting(behind, rng)
    shadow = rng.random() < shadow
    boxes = []
    for mask, x, y in glyphs:
        at = (left + x, top + y)
        if shadow:
            offset = max(1, size // 20)
            shade = (0, 0, 0) if _luminance(colour) > 127 else (255, 255, 255)
            canvas.paste(shade, (at[0] + offset, at[1] + offset), mask)
        canvas.paste(colour, at, mask)
        ys, xs = np.nonzero(np.asarray(mask) > 127)
        boxes.append(_grown([at[0] + xs.min(), at[1] + ys.min(), at[0] + xs.max() + 1, at[1] + ys.max() + 1],
                            width, height))

    if rng.random() < 0.6:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    if rng.random() < 0.5:  # a low-resolution camera
        f = rng.uniform(0.4, 0.9)
        small = canvas.resize((max(1, round(width * f)), max(1, round(height * f))), Image.BILINEAR)
        canvas = small.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(canvas).astype(np.float32)
    pixels += rng.normal(0, rng.uniform(0, 8), pixels.shape)
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=int(rng.integers(35, 95)))
    canvas = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return Synthetic(canvas, np.asarray(boxes, dtype=np.float32), np.asarray(digits, dtype=np.int64))


# Real-style house numbers (``--real-style``): how doors, plaques and facades show them.
STYLES = ("plate", "bordered", "painted", "engraved", "backlit", "brass", "tiles")
REAL_LENGTH_P = (0.1, 0.3, 0.35, 0.25)  # more long numbers than SVHN: streets, not crops of them
REAL_HEIGHT = (32, 200)
SUFFIX_P = 0.12  # a letter after the digits ("12A"): drawn, not labelled
WORDS_P = 0.2  # a street name or word above or below the number: drawn, not labelled
SUFFIX_LETTERS = "ABCDEFHKMNPRUVWX"
WORDS = ("MAIN ST", "AVENUE", "Rd", "No.", "STREET", "Haus", "Nr", "APT", "Via Roma", "Rue", "SUITE", "Lane",
         "PARK", "Office", "Gate", "BLOCK", "Court", "Strasse", "WELCOME", "Post")


def _gold(rng: np.random.Generator) -> tuple[int, int, int]:
    return (int(rng.integers(170, 235)), int(rng.integers(130, 190)), int(rng.integers(40, 110)))


def _shade(colour: tuple[int, int, int], by: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * by, 0, 255)) for c in colour)


def render_real(backgrounds: list[Image.Image], fonts: list[Path], rng: np.random.Generator,
                style: str | None = None, lighting: bool = True) -> Synthetic:
    """One house number as real photos show one, in a drawn ``style`` (:data:`STYLES`, default: one at
    random): on a plate, a bordered plaque, painted on the wall, engraved (low contrast, lit from one
    side), backlit (bright digits glowing on a dark sign), brass on wood or stone, or each digit on its
    own tile; sometimes with a letter suffix or a word nearby (drawn, not labelled), in low light or
    with glare (unless ``lighting`` is False). Only the digits are labelled, each box measured on its ink as :func:`render`."""
    style = style or STYLES[int(rng.integers(len(STYLES)))]
    length = int(rng.choice(LENGTHS, p=REAL_LENGTH_P))
    digits = [int(rng.integers(1, 10))] + [int(d) for d in rng.integers(0, 10, length - 1)]
    suffix = SUFFIX_LETTERS[int(rng.integers(len(SUFFIX_LETTERS)))] if rng.random() < SUFFIX_P else ""
    height = int(round(np.exp(rng.uniform(np.log(REAL_HEIGHT[0]), np.log(REAL_HEIGHT[1])))))
    digit_height = rng.uniform(0.3, 0.7) * height
    font_path = fonts[int(rng.integers(len(fonts)))]
    probe = ImageFont.truetype(str(font_path), 100)
    size = max(8, int(round(digit_height * 100 / (probe.getbbox("0")[3] - probe.getbbox("0")[1]))))
    font = ImageFont.truetype(str(font_path), size)
    stroke = int(rng.integers(1, max(2, size // 14) + 1)) if rng.random() < 0.2 else 0
    tracking = (rng.uniform(0.3, 0.8) if style == "tiles" else rng.uniform(-0.04, 0.3)) * size
    glyphs = _glyphs("".join(map(str, digits)) + suffix, font, tracking, stroke)
    x0, top0 = min(x for _, x, _ in glyphs), min(y for _, _, y in glyphs)
    line_w = max(x + m.width for m, x, _ in glyphs) - x0
    line_h = max(y + m.height for m, _, y in glyphs) - top0
    word = WORDS[int(rng.integers(len(WORDS)))] if rng.random() < WORDS_P else ""
    word_font = ImageFont.truetype(str(font_path), max(6, int(size * rng.uniform(0.25, 0.45))))
    word_h = (word_font.getbbox(word)[3] + 4) if word else 0
    width = max(int(round(height * rng.uniform(1.4, 3.4))), int(line_w * rng.uniform(1.15, 1.6)),
                int(word_font.getlength(word)) + 4 if word else 0)
    height = max(height, int(line_h * 1.25) + 2 * word_h + 4)

    canvas = random_crop(backgrounds[int(rng.integers(len(backgrounds)))], (width, height), rng, zoom=(1.0, 3.0)).convert("RGB")
    if style == "backlit":
        canvas = Image.fromarray((np.asarray(canvas) * rng.uniform(0.1, 0.35)).astype(np.uint8))
    left = int(rng.integers(0, width - line_w + 1)) - x0
    top = int(rng.integers(word_h, max(word_h + 1, height - line_h - word_h + 1))) - top0
    box = (left + x0, top + top0, left + x0 + line_w, top + top0 + line_h)
    draw = ImageDraw.Draw(canvas)
    pad_x, pad_y = rng.uniform(0.15, 0.5) * line_h, rng.uniform(0.1, 0.3) * line_h
    plate = (max(0, box[0] - pad_x), max(0, box[1] - pad_y), min(width - 1, box[2] + pad_x), min(height - 1, box[3] + pad_y))
    radius = rng.uniform(0, 0.3) * line_h
    if style in ("plate", "bordered", "engraved"):
        behind = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rounded_rectangle(plate, radius=radius, fill=behind)
    elif style == "brass":
        behind = tuple(int(c) for c in (rng.integers(10, 90, 3) if rng.random() < 0.7 else rng.integers(150, 230, 3)))
        draw.rounded_rectangle(plate, radius=radius, fill=behind)
    else:
        behind = tuple(int(c) for c in np.asarray(canvas.crop(box)).reshape(-1, 3).mean(0))
    colour = {"brass": _gold(rng), "backlit": tuple(int(c) for c in rng.integers(200, 256, 3))}.get(style) or _contrasting(behind, rng)
    if style == "engraved":  # cut into the plate: a little darker, lit on one edge
        colour = _shade(behind, rng.uniform(0.45, 0.75)) if _luminance(behind) > 60 else _shade(behind, 2.2)
    if style == "bordered":
        draw.rounded_rectangle(plate, radius=radius, outline=colour, width=max(1, int(line_h / rng.uniform(10, 20))))
    if style == "tiles":
        tile = tuple(int(c) for c in rng.integers(170, 256, 3))
        colour = _contrasting(tile, rng)

    boxes = []
    for k, (mask, x, y) in enumerate(glyphs):
        at = (left + x, top + y)
        if style == "tiles" and k < len(digits):
            side = max(mask.width, mask.height) * 1.35
            cx, cy = at[0] + mask.width / 2, at[1] + mask.height / 2
            draw.rounded_rectangle((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), radius=side * 0.1, fill=tile,
                                   outline=_shade(tile, 0.6))
        if style == "backlit":
            glow = mask.filter(ImageFilter.GaussianBlur(max(1.0, size / 12)))
            canvas.paste(_shade(colour, 0.8), at, glow)
        elif style == "engraved":
            lit = _shade(behind, 1.5) if _luminance(behind) < 200 else (255, 255, 255)
            canvas.paste(lit, (at[0] + max(1, size // 40), at[1] + max(1, size // 40)), mask)
        elif rng.random() < 0.25:
            canvas.paste(_shade(colour, 0.3) if _luminance(colour) > 127 else _shade(behind, 0.5),
                         (at[0] + max(1, size // 25), at[1] + max(1, size // 25)), mask)
        canvas.paste(colour, at, mask)
        if k < len(digits):
            ink = np.asarray(mask)
            ys, xs = np.nonzero(ink > min(127, int(ink.max()) // 2))  # a hairline digit at a small size: its darkest
            boxes.append(_grown([at[0] + xs.min(), at[1] + ys.min(), at[0] + xs.max() + 1, at[1] + ys.max() + 1],
                                width, height))
    if word:
        above = rng.random() < 0.5 and box[1] >= word_h
        wy = box[1] - word_h if above else min(height - word_h, box[3] + 2)
        draw.text((int(rng.integers(0, max(1, width - int(word_font.getlength(word))))), wy), word, fill=colour, font=word_font)

    pixels = np.asarray(canvas).astype(np.float32)
    if lighting and rng.random() < 0.15:  # glare: a bright patch
        yy, xx = np.mgrid[0:height, 0:width]
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.2, 0.6) * max(width, height)
        pixels += (np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)) * rng.uniform(60, 160))[..., None]
    if lighting and rng.random() < 0.15:  # low light
        pixels = 255 * (pixels / 255).clip(0, 1) ** rng.uniform(1.5, 2.5) * rng.uniform(0.4, 0.8)
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.5)))
    if rng.random() < 0.4:
        f = rng.uniform(0.35, 0.9)
        canvas = canvas.resize((max(1, round(width * f)), max(1, round(height * f))), Image.BILINEAR).resize((width, height), Image.BILINEAR)
    pixels = np.asarray(canvas).astype(np.float32) + rng.normal(0, rng.uniform(0, 10), (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(40, 95)))
    return Synthetic(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.asarray(boxes, np.float32),
                     np.asarray(digits, np.int64), suffix, word)


def load_backgrounds(paths: list[Path], max_side: int = 640) -> list[Image.Image]:
    return [open_background(p, max_side) for p in paths]


def set_paths(out: Path) -> tuple[Path, Path]:
    """Where a synthetic set in ``out`` keeps its images and its HW2 COCO file."""
    return out / "images", out / "synth.json"


def write_synthetic(count: int, backgrounds: list[Image.Image], fonts: list[Path], seed: int, out: Path,
                    real_style: bool = False) -> Path:
    """Write ``count`` synthetic numbers (SVHN-like, or :func:`render_real`'s with ``real_style``) and
    their HW2 COCO file to :func:`set_paths` of ``out``."""
    if not fonts:
        raise FileNotFoundError(f"no TrueType fonts under {FONT_ROOT} (apt install fonts-dejavu fonts-liberation)")
    if not backgrounds:
        raise FileNotFoundError("no background photos (python -m train.scenes --install, or --backgrounds DIR)")
    rng = np.random.default_rng(seed)
    folder, path = set_paths(out)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(1, count + 1):
        s = render_real(backgrounds, fonts, rng) if real_style else render(backgrounds, fonts, rng)
        name = f"synth_{i:06d}.jpg"
        s.image.save(folder / name, quality=95)
        images.append({"id": i, "file_name": name, "width": s.image.width, "height": s.image.height,
                       "label_tier": "synthetic"})
        for (x1, y1, x2, y2), d in zip(s.boxes.tolist(), s.digits.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "category_id": d + 1, "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": d + 1, "name": str(d)} for d in range(10)],
            "info": {"generator": "train.synth", "seed": seed, "real_style": real_style, "fonts": [p.name for p in fonts]}}
    path.write_text(json.dumps(coco) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backgrounds", type=Path, help="a folder of photos (default: train.scenes' training backgrounds)")
    p.add_argument("--fonts", type=Path, default=FONT_ROOT, help="where to look for .ttf fonts")
    p.add_argument("--out", type=Path, default=Path("runs/synth"))
    p.add_argument("--real-style", action="store_true", help="house numbers as real photos show them (render_real)")
    p.add_argument("--install", action="store_true", help="install the font packages (apt) and stop")
    args = p.parse_args(argv)
    if args.install:
        from .scenes import install

        install(FONT_PACKAGES)
        return 0
    if args.backgrounds:
        paths = sorted(f for f in args.backgrounds.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    else:
        from .scenes import background_pool

        paths = background_pool("train")
    fonts = find_fonts(args.fonts)
    path = write_synthetic(args.count, load_backgrounds(paths), fonts, args.seed, args.out, args.real_style)
    print(f"wrote {path}: {args.count} numbers in {len(fonts)} fonts on {len(paths)} backgrounds", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
