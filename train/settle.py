"""Choose how the readers and PP-OCR share an SVHN-sized photo, on the tuning split, and write it into a
checkpoint folder's ``ppocr.json``.

The default pipeline reads each SVHN-sized photo whole with the readers first; their number stands,
without PP-OCR, where it is at least ``settle`` sure, and else PP-OCR's reading of the photo whole
overrules theirs where PP-OCR is at least ``min_score_whole`` sure (``digit_demo.ocr.TextSettings``).
How sure a reader is depends on the reader, so each release chooses both anew for its own readers: the
default pipeline of the checkpoints in ``$DIGIT_DEMO_CHECKPOINTS`` reads ``--gt``'s photos once per
value (the detections kept between passes), first each ``settle`` bar, then each ``min_score_whole`` at
the chosen bar, and the value that reads the most numbers at the pipeline's threshold wins. Ties go to
the lowest ``settle`` (it settles the most photos, so reads fastest) and the highest
``min_score_whole`` (PP-OCR overrules the readers only where it is surest). The folder's ``ppocr.json``
gets both, where they were chosen and every value's count. The reproduction's ``calibrate`` stage runs
it before it measures.

    DIGIT_DEMO_CHECKPOINTS=runs/calibrate/checkpoints python -m train.settle --gt runs/splits/tune.json \\
        --images ../shared/data/svhn/train
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

SETTLE = [0.7, 0.8, 0.85, 0.9, 0.95]
MIN_SCORE_WHOLE = [0.8, 0.85, 0.9, 0.95]


def choose(counts: list[tuple[float | None, int]], lowest: bool = True) -> float | None:
    """The value that read the most numbers; among equals the lowest (``lowest``) or the highest, with
    None (no bar: PP-OCR on every photo) last."""
    top = max(count for _, count in counts)
    tied = [value for value, count in counts if count == top and value is not None]
    return (min if lowest else max)(tied, default=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.settle", description=__doc__.split("\n\n")[0])
    p.add_argument("--gt", type=Path, required=True, help="the tuning split's COCO json")
    p.add_argument("--images", type=Path, required=True, help="its image folder")
    p.add_argument("--settle", type=float, nargs="+", default=SETTLE, help="bars tried (and none)")
    p.add_argument("--min-score-whole", type=float, nargs="+", default=MIN_SCORE_WHOLE)
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
    settings, tuning = text_settings(), {}

    def read_at(**change) -> int:
        pipe.locator.settings = replace(settings, **change)
        got = [r.number(pipe.threshold).text for r in pipe.read_iter(paths)]
        return sum(g == truth[im["id"]] for g, im in zip(got, coco["images"]))

    for name, values, lowest in (("settle", [*sorted(args.settle), None], True),
                                 ("min_score_whole", sorted(args.min_score_whole), False)):
        counts = [(value, read_at(**{name: value})) for value in values]
        tuning[name] = [{name: value, "read": count, "of": len(paths)} for value, count in counts]
        settings = replace(settings, **{name: choose(counts, lowest)})
        print(f"{name}: " + ", ".join(f"{v}: {c}" for v, c in counts) + f" of {len(paths)} -> {getattr(settings, name)}",
              file=sys.stderr)
    split = f"tuning split ({args.gt.name}, {len(paths)} photos), at threshold {pipe.threshold:.2f}"
    path = write_sidecar(CHECKPOINT_DIR, settings, {name: split for name in tuning}, tuning)
    print(f"written into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
