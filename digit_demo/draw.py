"""Drawing detections: a fixed colour per digit and readable score labels."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .assemble import Detections

# One fixed colour per digit 0-9 (Tableau 10), so a digit looks the same in every image.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def draw_detections(image: Image.Image, dets: Detections, min_side: int = 320) -> Image.Image:
    """A copy of ``image`` (upscaled so its short side is at least ``min_side``) with boxed digits."""
    scale = max(1.0, min_side / max(1, min(image.size)))
    out = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 120))
    font = _font(max(12, round(min(out.size) / 14)))
    for (x1, y1, x2, y2), score, digit in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.digits.tolist()):
        colour = PALETTE[int(digit) % 10]
        box = [x1 * scale, y1 * scale, x2 * scale, y2 * scale]
        draw.rectangle(box, outline=colour, width=width)
        text = f"{int(digit)} {score:.2f}"
        tb = draw.textbbox((box[0], box[1]), text, font=font)
        ty = box[1] - (tb[3] - tb[1]) - 4 if box[1] - (tb[3] - tb[1]) - 4 >= 0 else box[3] + 1
        tb = draw.textbbox((box[0], ty), text, font=font)
        draw.rectangle([tb[0] - 2, tb[1] - 2, tb[2] + 2, tb[3] + 2], fill=colour)
        draw.text((box[0], ty), text, fill="white", font=font, stroke_width=1, stroke_fill="black")
    return out
