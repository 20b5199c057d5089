"""Drawing detections: a fixed colour per digit and readable score labels."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .types import Detections

# One fixed colour per digit 0-9 (Tableau 10), so a digit looks the same in every image.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
REGION_COLOUR = "#ff2d55"
DETAIL_SIDE = 2048  # the longest side of a drawing of digits (a crop, or a region zoomed in)
OVERVIEW_SIDE = 1280  # the longest side of a drawing of a whole photo with its numbers marked


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _scaled(image: Image.Image, min_side: int, max_side: int) -> tuple[Image.Image, float]:
    """``image`` as RGB, upscaled so its short side is at least ``min_side`` but never so its long side
    exceeds ``max_side`` (a larger photo is shrunk to it), and the scale used."""
    scale = min(max(1.0, min_side / max(1, min(image.size))), max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.LANCZOS), scale


def shrunk(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """``image`` shrunk (never enlarged) so its long side is at most ``max_side``, and the scale used;
    ``image`` itself where it is small enough. Drawing a shrunk copy at ``max_side`` (its boxes times the
    scale: ``box_scale``) gives the drawing of the image itself."""
    if max(image.size) <= max_side:
        return image, 1.0
    return _scaled(image, 1, max_side)


def draw_detections(image: Image.Image, dets: Detections, min_side: int = 320, max_side: int = DETAIL_SIDE,
                    box_scale: float = 1.0) -> Image.Image:
    """A copy of ``image`` with boxed digits (:func:`_scaled` sizes it; ``dets`` are in the pixels of
    an image ``box_scale`` times smaller or larger: :func:`shrunk`). Labels ("digit score") sit above
    their box, alternating above and below from left to right, and are sized to the boxes, so
    neighbouring digits' labels do not cover each other even where digits are small."""
    out, scale = _scaled(image, min_side, max_side)
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 120))
    boxes = dets.boxes * (box_scale * scale)
    heights = boxes[:, 3] - boxes[:, 1] if len(boxes) else np.zeros(0)
    size = int(np.clip(np.median(heights) * 0.45 if len(boxes) else 14, 12, max(12, min(out.size) / 12)))
    font = _font(size)
    order = np.argsort(boxes[:, 0]) if len(boxes) else []
    for rank, k in enumerate(order):
        x1, y1, x2, y2 = boxes[k].tolist()
        digit, score = int(dets.digits[k]), float(dets.scores[k])
        colour = PALETTE[digit % 10]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{digit} {score:.2f}"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        above = y1 - th - 4
        below = y2 + 3
        ty = above if (rank % 2 == 0 and above >= 0) or below + th > out.height else below
        tx = min(max(0, x1), max(0, out.width - tw - 2))
        tb = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle([tb[0] - 2, tb[1] - 2, tb[2] + 2, tb[3] + 2], fill=colour)
        draw.text((tx, ty), text, fill="white", font=font, stroke_width=1, stroke_fill="black")
    return out


def draw_regions(image: Image.Image, boxes: list, labels: list[str], max_side: int = OVERVIEW_SIDE,
                 box_scale: float = 1.0) -> Image.Image:
    """A copy of a whole photo (shrunk to ``max_side``) with each located region outlined and labelled
    with the number read there (``boxes`` in the pixels of an image ``box_scale`` times smaller: :func:`shrunk`)."""
    out, scale = _scaled(image, 1, max_side)
    scale *= box_scale
    draw = ImageDraw.Draw(out)
    width = max(3, round(max(out.size) / 300))
    font = _font(max(14, round(max(out.size) / 40)))
    for box, label in zip(boxes, labels):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        pad = width * 2
        draw.rectangle([x1 - pad, y1 - pad, x2 + pad, y2 + pad], outline=REGION_COLOUR, width=width)
        if label:
            tb = draw.textbbox((x1 - pad, 0), label, font=font)
            ty = y1 - pad - (tb[3] - tb[1]) - 6
            ty = ty if ty >= 0 else y2 + pad + 2
            tb = draw.textbbox((x1 - pad, ty), label, font=font)
            draw.rectangle([tb[0] - 3, tb[1] - 3, tb[2] + 3, tb[3] + 3], fill=REGION_COLOUR)
            draw.text((x1 - pad, ty), label, fill="white", font=font)
    return out
