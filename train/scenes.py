"""Synthetic street scenes: real SVHN crops pasted into real photos that hold no house number.

No photos with small house numbers exist here, so the locator learns from, and the scene benchmark
measures on, scenes built from what does: each SVHN crop is scaled so its digits span a chosen share
of the scene's height, warped by a slight perspective, feathered at its edges and pasted into a
background photo from a Debian wallpaper package; distractor patches (other photos, and SVHN wall
margins that hold no digit) are pasted the same way, so a pasted rectangle is not itself the cue; the
scene is then blurred, noised and JPEG-compressed. Every step draws from one seeded generator, so a
seed and a list of crops give the same scenes on every machine with the same packages.

Backgrounds come from ``plasma-workspace-wallpapers``, ``gnome-backgrounds`` and ``sway-backgrounds``,
split by name between training and the scene benchmark (:func:`background_pool`); ``mate-backgrounds``
and ``ukui-wallpapers`` are held out of both, for a check on backgrounds no model has seen.

    python -m train.scenes --install                       # the background packages (apt)
    python -m train.scenes --split valid --seed 1 --out out/scenes/valid   # the scene benchmark's photos
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from digit_demo.data import annotations_by_image, load_coco

PACKAGES = {"train": ("plasma-workspace-wallpapers", "gnome-backgrounds", "sway-backgrounds"),
            "heldout": ("mate-backgrounds", "ukui-wallpapers")}
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SIZES = ((1600, 1200), (2016, 1512), (1200, 1600))  # scene sizes (width, height), as phone photos
BENCH_SHARE = 0.3  # of the training packages' backgrounds, by name, kept for the scene benchmark


def install(packages: tuple[str, ...] = PACKAGES["train"] + PACKAGES["heldout"]) -> None:
    """Install the background packages with apt (Debian), where they are missing."""
    missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def package_images(package: str) -> list[Path]:
    """One image per wallpaper of an installed package: where a wallpaper comes in several sizes
    (plasma's ``contents/images/WxH.ext``), the one closest to 1920 px wide; screenshots left out."""
    listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if listed.returncode:
        raise FileNotFoundError(f"background package {package!r} is not installed (python -m train.scenes --install)")
    files = [Path(p) for p in listed.stdout.split() if Path(p).suffix.lower() in SUFFIXES and Path(p).is_file()]
    files = [f for f in files if "screenshot" not in f.name]
    chosen: dict[str, Path] = {}
    for f in files:
        key = str(f.parent.parent.parent) if f.parent.name == "images" else str(f.with_suffix(""))
        width = int(f.stem.split("x")[0]) if f.stem.split("x")[0].isdigit() else 1920
        best = chosen.get(key)
        if best is None or abs(width - 1920) < abs(_width(best) - 1920):
            chosen[key] = f
    return sorted(chosen.values())


def _width(f: Path) -> int:
    return int(f.stem.split("x")[0]) if f.stem.split("x")[0].isdigit() else 1920


def background_pool(kind: str) -> list[Path]:
    """Background photos for ``kind``: "train" and "bench" split the training packages' wallpapers by
    a hash of their path (BENCH_SHARE to the benchmark); "heldout" are the held-out packages'."""
    if kind == "heldout":
        return [f for p in PACKAGES["heldout"] for f in package_images(p)]
    files = [f for p in PACKAGES["train"] for f in package_images(p)]
    bench = [f for f in files if int(hashlib.sha1(str(f).encode()).hexdigest(), 16) % 100 < 100 * BENCH_SHARE]
    return bench if kind == "bench" else [f for f in files if f not in bench]


@dataclass
class Crop:
    """An SVHN photo and its digits: xyxy boxes in its pixels, digits 0-9, the number they read."""

    image: Image.Image
    boxes: np.ndarray
    digits: np.ndarray
    name: str = ""

    @property
    def text(self) -> str:
        order = np.argsort((self.boxes[:, 0] + self.boxes[:, 2]) / 2, kind="stable")
        return "".join(str(int(d)) for d in self.digits[order])


def load_crops(coco_json: Path, images: Path, limit: int | None = None) -> list[Crop]:
    """The photos of an HW2 COCO file with at least one digit box, in file order."""
    gt = load_coco(coco_json)
    by_image = annotations_by_image(gt)
    out = []
    for im in gt["images"][:limit]:
        anns = by_image.get(im["id"], [])
        if not anns:
            continue
        xywh = np.array([a["bbox"] for a in anns], np.float32)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        digits = np.array([a["category_id"] - 1 for a in anns], np.int64)
        with Image.open(images / im["file_name"]) as img:
            out.append(Crop(img.convert("RGB"), boxes, digits, im["file_name"]))
    return out


@dataclass
class Scene:
    """A composed photo, each pasted number's region (the union of its digit boxes, xyxy), its digit
    boxes and digits, and the number it reads, all in the photo's pixels."""

    image: Image.Image
    regions: list[list[float]] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    digits: list[np.ndarray] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def open_background(path: Path, max_side: int | None = None) -> Image.Image:
    """A background photo as RGB, shrunk to ``max_side`` on its long side where given."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    return img


def random_crop(source: Path | Image.Image, size: tuple[int, int], rng: np.random.Generator,
                zoom: tuple[float, float] = (1.0, 1.6)) -> Image.Image:
    """A random ``size`` crop of the background, enlarged first by a random ``zoom`` over just covering ``size``."""
    img = open_background(source) if isinstance(source, Path) else source
    w, h = size
    scale = max(w / img.width, h / img.height) * rng.uniform(*zoom)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BILINEAR)
    x, y = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
    return img.crop((x, y, x + w, y + h))


def _warp(patch: Image.Image, boxes: np.ndarray, rng: np.random.Generator, jitter: float = 0.06
          ) -> tuple[torch.Tensor, np.ndarray]:
    """``patch`` as RGBA (alpha: feathered edges) under a slight random perspective, and ``boxes``
    moved with it (box-aware, torchvision.transforms.v2)."""
    w, h = patch.size
    rgb = TF.pil_to_tensor(patch)
    alpha = torch.zeros(1, h, w, dtype=torch.uint8)
    edge = max(1, round(0.05 * min(w, h)))
    alpha[:, edge:-edge or None, edge:-edge or None] = 255
    alpha = TF.gaussian_blur(alpha, [2 * edge + 1] * 2, [edge / 1.5] * 2)
    image = torch.cat([rgb, alpha])
    corners = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
    dx, dy = jitter * w, jitter * h
    moved = [[x + s * rng.uniform(0, dx), y + t * rng.uniform(0, dy)]
             for (x, y), (s, t) in zip(corners, ((1, 1), (-1, 1), (-1, -1), (1, -1)))]
    warped = TF.perspective(image, corners, moved, fill=0)
    bb = tv_tensors.BoundingBoxes(torch.from_numpy(boxes).float(), format="XYXY", canvas_size=(h, w))
    moved_boxes = TF.perspective(bb, corners, moved)
    return warped, moved_boxes.numpy()


def _paste(canvas: torch.Tensor, patch: torch.Tensor, x: int, y: int) -> None:
    """Alpha-blend an RGBA uint8 ``patch`` into a float RGB ``canvas`` at (x, y), in place."""
    a = patch[3:].float() / 255
    region = canvas[:, y : y + patch.shape[1], x : x + patch.shape[2]]
    region.mul_(1 - a).add_(patch[:3].float() * a)


def _overlaps(box: list[float], taken: list[list[float]], margin: float = 0.0) -> bool:
    return any(box[0] < t[2] + margin and t[0] < box[2] + margin and box[1] < t[3] + margin and t[1] < box[3] + margin
               for t in taken)


def _margin_patch(crop: Crop) -> Image.Image | None:
    """A strip of an SVHN photo beside its digits (wall, no digit), or None where there is none."""
    left, right = float(crop.boxes[:, 0].min()), float(crop.boxes[:, 2].max())
    h = crop.image.height
    if left >= 0.5 * h:
        return crop.image.crop((0, 0, int(left), h))
    if crop.image.width - right >= 0.5 * h:
        return crop.image.crop((int(right) + 1, 0, crop.image.width, h))
    return None


def compose(numbers: list[Crop], background: Path | Image.Image, rng: np.random.Generator,
            size: tuple[int, int] | None = None, digit_share: tuple[float, float] = (0.02, 0.15),
            distractors: tuple[int, int] = (1, 4), others: list[Path | Image.Image] | None = None,
            margins: list[Crop] | None = None, blur: float = 1.2) -> Scene:
    """One scene: ``numbers`` pasted into ``background`` at ``size`` (default: one of SIZES), each
    scaled so its digits' median height is a random share of the scene's height in ``digit_share``,
    with a random count in ``distractors`` of patches from ``others`` (backgrounds) and ``margins``
    (SVHN photos' digit-free strips); then blur (radius up to ``blur`` px), noise and JPEG. Without
    ``numbers`` the scene holds distractors only."""
    w, h = size or SIZES[rng.integers(len(SIZES))]
    canvas = TF.pil_to_tensor(random_crop(background, (w, h), rng)).float()
    scene, taken = Scene(Image.new("RGB", (1, 1))), []
    for crop in numbers:
        digit_h = float(np.median(crop.boxes[:, 3] - crop.boxes[:, 1]))
        scale = rng.uniform(*digit_share) * h / max(digit_h, 1.0)
        scale = min(scale, 0.8 * w / crop.image.width, 0.8 * h / crop.image.height)
        pw, ph = max(4, round(crop.image.width * scale)), max(4, round(crop.image.height * scale))
        sx, sy = pw / crop.image.width, ph / crop.image.height
        patch, boxes = _warp(crop.image.resize((pw, ph), Image.BICUBIC), crop.boxes * np.array([sx, sy, sx, sy]), rng)
        for _ in range(50):
            x, y = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
            if not _overlaps([x, y, x + pw, y + ph], taken, 0.05 * h):
                break
        _paste(canvas, patch, x, y)
        taken.append([x, y, x + pw, y + ph])
        placed = (boxes + [x, y, x, y]).astype(np.float32)
        scene.boxes.append(placed)
        scene.digits.append(crop.digits.copy())
        scene.regions.append([float(placed[:, 0].min()), float(placed[:, 1].min()),
                              float(placed[:, 2].max()), float(placed[:, 3].max())])
        scene.texts.append(crop.text)
    for _ in range(int(rng.integers(distractors[0], distractors[1] + 1))):
        source = None
        if margins and rng.random() < 0.5:
            source = _margin_patch(margins[rng.integers(len(margins))])
        if source is None and others:
            other = others[rng.integers(len(others))]
            img = open_background(other) if isinstance(other, Path) else other
            cw, ch = int(img.width * rng.uniform(0.1, 0.4)), int(img.height * rng.uniform(0.1, 0.4))
            x0, y0 = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
            source = img.crop((x0, y0, x0 + cw, y0 + ch))
        if source is None:
            continue
        ph = max(8, round(h * rng.uniform(0.03, 0.25)))
        pw = max(8, min(w - 1, round(ph * source.width / source.height)))
        patch, _ = _warp(source.resize((pw, ph), Image.BICUBIC), np.zeros((0, 4), np.float32), rng)
        for _ in range(20):
            x, y = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, max(1, h - ph + 1)))
            if not _overlaps([x, y, x + pw, y + ph], taken[: len(numbers)], 0.02 * h):
                _paste(canvas, patch, x, y)
                break
    image = Image.fromarray(canvas.clamp(0, 255).round().byte().permute(1, 2, 0).numpy())
    radius = rng.uniform(0, blur)
    if radius > 0.25 * blur:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    noise = rng.uniform(0, 6)
    arr = np.asarray(image, np.float32) + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
    scene.image = Image.open(io.BytesIO(buf.getvalue()))
    scene.image.load()
    return scene


def scene_set(crops: list[Crop], backgrounds: list[Path], seed: int, digit_share: tuple[float, float] = (0.03, 0.10),
              margins: list[Crop] | None = None):
    """One scene per crop, in order, from one seeded generator (the scene benchmark uses digits at
    3-10% of the height, as the product's users' photos)."""
    rng = np.random.default_rng(seed)
    for crop in crops:
        yield compose([crop], backgrounds[rng.integers(len(backgrounds))], rng, digit_share=digit_share,
                      others=backgrounds, margins=margins)


def write_scene_set(crops: list[Crop], backgrounds: list[Path], seed: int, out: Path) -> Path:
    """Write a scene set as JPEGs (named as the crops) plus ``scenes.json``: COCO digit boxes
    (``category_id`` = digit + 1, as HW2) and each image's number ``regions``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    images, annotations, regions, texts = [], [], {}, {}
    for k, (crop, scene) in enumerate(zip(crops, scene_set(crops, backgrounds, seed, margins=crops)), 1):
        name = Path(crop.name).with_suffix(".jpg").name
        data = io.BytesIO()
        scene.image.save(data, "JPEG", quality=95)  # already JPEG-degraded once; keep it
        (out / name).write_bytes(data.getvalue())
        image_id = int(Path(name).stem) if Path(name).stem.isdigit() else k
        images.append({"id": image_id, "file_name": name, "width": scene.image.width, "height": scene.image.height})
        for box, digit in zip(scene.boxes[0], scene.digits[0]):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(digit) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        regions[image_id] = scene.regions
        texts[image_id] = scene.texts
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": d + 1, "name": str(d)} for d in range(10)], "regions": regions, "texts": texts,
            "seed": seed, "backgrounds": [str(b) for b in backgrounds]}
    path = out / "scenes.json"
    path.write_text(json.dumps(coco))
    return path


def fixture_scenes(fixtures: Path, out: Path, seed: int = 7) -> Path:
    """The test suite's scenes: fixture crops 1103 ("887") and 1108 ("35") alone, and 1120 ("48") with
    1136 ("416") in one photo, on the benchmark's backgrounds, 1600 x 1200, JPEG quality 80."""
    crops = {Path(c.name).stem: c for c in load_crops(fixtures / "valid.json", fixtures / "valid")}
    backgrounds = background_pool("bench")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    truth = {"images": [], "regions": {}, "texts": {}}
    for k, names in enumerate((["1103"], ["1108"], ["1120", "1136"]), 1):
        scene = compose([crops[n] for n in names], backgrounds[rng.integers(len(backgrounds))], rng, size=(1600, 1200),
                        digit_share=(0.04, 0.08), others=backgrounds, margins=list(crops.values()))
        name = f"scene{k}.jpg"
        scene.image.save(out / name, quality=80)
        truth["images"].append({"id": k, "file_name": name, "width": 1600, "height": 1200})
        truth["regions"][k], truth["texts"][k] = scene.regions, scene.texts
    path = out / "scenes.json"
    path.write_text(json.dumps(truth, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--install", action="store_true", help="install the background packages (apt) and stop")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "svhn")
    p.add_argument("--split", default="valid", help="the crops: an HW2 split inside --data (valid, train)")
    p.add_argument("--backgrounds", choices=["bench", "train", "heldout"], default="bench")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--limit", type=int)
    p.add_argument("--out", type=Path, default=Path("out/scenes/valid"))
    args = p.parse_args(argv)
    if args.install:
        install()
        return 0
    crops = load_crops(args.data / f"{args.split}.json", args.data / args.split, args.limit)
    path = write_scene_set(crops, background_pool(args.backgrounds), args.seed, args.out)
    print(f"wrote {path} ({len(crops)} scenes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
