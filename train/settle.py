"""Choose the readers' ``settle`` bar on the tuning split and write it into a checkpoint folder's ``ppocr.json``.

The default pipeline reads each SVHN-sized photo whole with the readers first; their number stands,
without PP-OCR, where it is at least ``settle`` sure (``digit_demo.ocr.TextSettings``). How sure a
reader is depends on the reader, so each release chooses the bar anew for its own readers: the default
pipeline of the checkpoints in ``$DIGIT_DEMO_CHECKPOINTS`` reads ``--gt``'s photos once per bar (the
detections kept between passes), and the bar that reads the most numbers at the pipeline's threshold
wins; a tie goes to the lowest, which settles the most photos and so reads fastest. The folder's
``ppocr.json`` gets the bar, where it was chosen and every bar's count. The reproduction's ``calibrate``
stage runs it before it measures.

    DIGIT_DEMO_CHECKPOINTS=runs/calibrate/checkpoints python -m train.settle --gt runs/splits/tune.json \\
        --images ../shared/data/svhn/train
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

BARS = [0.7, 0.8, 0.85, 0.9, 0.95]


def choose(bar_counts: list[tuple[float | None, int]]) -> float | None:
    """The bar that read the most numbers; among equals, the lowest (None, PP-OCR on every photo, last)."""
    top = max(count for _, count in bar_counts)
    tied = [bar for bar, count in bar_counts if count == top]
    return min((b for b in tied if b is not None), default=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.settle", description=__doc__.split("\n\n")[0])
    p.add_argument("--gt", type=Path, required=True, help="the tuning split's COCO json")
    p.add_argument("--images", type=Path, required=True, help="its image folder")
    p.add_argument("--bars", type=float, nargs="+", default=BARS)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)

    from digit_demo.checkpoints import CHECKPOINT_DIR
    from digit_demo.data import gt_numbers, load_coco
    from digit_demo.detect import set_threads
    from digit_demo.ocr import TextFinder, text_settings, write_sidecar
    from digit_demo.pipeline import Pipeline, PipelineConfig

    set_threads(args.threads)
    pipe = Pipeline(PipelineConfig(precision="fp32"), memo={})
    if not isinstance(pipe.locator, TextFinder):
        raise SystemExit("error: the default pipeline here does not locate with PP-OCR (pip install -r requirements.txt)")
    coco = load_coco(args.gt)
    truth = gt_numbers(coco)
    paths = [args.images / im["file_name"] for im in coco["images"]]
    base = text_settings()
    rows, counts = [], []
    for bar in [*sorted(args.bars), None]:
        pipe.locator.settings = replace(base, settle=bar)
        got = [r.number(pipe.threshold).text for r in pipe.read_iter(paths)]
        count = sum(g == truth[im["id"]] for g, im in zip(got, coco["images"]))
        counts.append((bar, count))
        rows.append({"settle": bar, "read": count, "of": len(paths)})
        print(f"settle {bar}: {count} of {len(paths)}", file=sys.stderr)
    chosen = choose(counts)
    split = f"tuning split ({args.gt.name}, {len(paths)} photos), at threshold {pipe.threshold:.2f}"
    path = write_sidecar(CHECKPOINT_DIR, replace(base, settle=chosen), {"settle": split}, {"settle": rows})
    print(f"settle {chosen} written into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
