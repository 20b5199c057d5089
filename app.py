"""Gradio demo: drop house-number photos, pick a detector or an ensemble, move the threshold."""
from __future__ import annotations

import argparse
import functools
import os
import tempfile
from pathlib import Path

import gradio as gr

from digit_demo.calibration import measured_key, sweep_curves, threshold_for
from digit_demo.card import model_label
from digit_demo.checkpoints import DEFAULT_MODEL, available
from digit_demo.detect import env_count, set_threads
from digit_demo.ensemble import DEFAULT_FUSION
from digit_demo.evaluation import best, plot_sweep
from digit_demo.locator import DEFAULT_LOCATOR
from digit_demo.ocr import PPOCR
from digit_demo.pipeline import DEFAULT_CACHE, Pipeline, PipelineConfig
from digit_demo.session import Session, save_images, write_downloads

EXAMPLES = sorted(str(p) for p in (Path(__file__).parent / "examples").iterdir() if p.suffix in (".png", ".jpg"))
MAX_IMAGES = 32


def _count(name: str, default: int) -> int:
    """``$name`` as a positive whole number, else ``default``; one clear line and exit for anything else."""
    try:
        return env_count(name, default)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# Serving policy: one reading per core at a time, each on one thread (read by every pipeline:
# digit_demo.detect.set_threads), so concurrent readings never share a core's threads; and a queue long
# enough that a burst of visitors waits instead of being refused (benchmark.py --load-test measures both).
CONCURRENCY = _count("DIGIT_DEMO_CONCURRENCY", len(os.sched_getaffinity(0)))
# After every event Gradio's queue summarises all it has recorded (up to 10,000 events, in pandas) for its
# monitoring page, which this app does not enable: 2 ms of CPU an event at 300 recorded, 7 ms at 10,000
# (docs/experiments.md). Once every 1,000 events instead; read when the queue is built (demo.queue below).
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
QUEUE_SIZE = _count("DIGIT_DEMO_QUEUE", 512)
set_threads(_count("DIGIT_DEMO_THREADS", 1))
BASE = PipelineConfig()
# What finds the numbers on the page: the library's default (PP-OCR's text lines where its packages are
# installed: digit_demo.pipeline.default_locator), or the CNN locator.
FINDERS = [("PP-OCR text lines (best on real photos)", PPOCR), ("CNN locator (faster, weaker on real photos)", DEFAULT_LOCATOR)]
FINDER = BASE.locator
READER = DEFAULT_CACHE.digit_reader(BASE.digit_reader, BASE.precision)  # shipped, if any


def reading_with_reader(use_reader: bool) -> bool:
    """Whether the reader checkbox's setting puts the digit reader to work (it must be shipped)."""
    return bool(use_reader) and READER is not None


def config_for(models, fusion: str, use_reader: bool = True, multi_scale: bool = False,
               finder: str = FINDER) -> PipelineConfig:
    """The pipeline the page's settings describe; without the digit reader the number readers are off too."""
    return PipelineConfig(tuple(models or [DEFAULT_MODEL]), fusion or DEFAULT_FUSION,
                          digit_reader=BASE.digit_reader if reading_with_reader(use_reader) else None,
                          multi_scale=bool(multi_scale), locator=finder or FINDER)


def pipeline_for(models, fusion: str, use_reader: bool = True, multi_scale: bool = False, finder: str = FINDER) -> Pipeline:
    """The pipeline for the page's settings, built once per configuration and shared by every visitor
    (its networks through :data:`DEFAULT_CACHE`), so a request does not re-read the calibration."""
    return _pipeline(config_for(models, fusion, use_reader, multi_scale, finder))


@functools.lru_cache(maxsize=64)
def _pipeline(config: PipelineConfig) -> Pipeline:
    return Pipeline(config)


def _paths(files) -> list[str]:
    if not files:
        return []
    files = files if isinstance(files, list) else [files]
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]


NUMBER_HTML = """<div style="text-align:center;padding:8px 0">
<div style="font-size:64px;font-weight:700;letter-spacing:6px;line-height:1.1">{number}</div>
<div style="font-size:14px;opacity:.75">{detail}</div></div>"""


def _outputs(session: Session, threshold: float, selected: int = 0):
    rendered = session.render(threshold)
    note = "\n".join(f"⚠️ {e}" for e in session.errors)
    if not rendered:
        empty = NUMBER_HTML.format(number="–", detail="no image yet" if not session.errors else "no readable image")
        return session, None, empty, [], [], [], None, note, gr.update(value=None, visible=False), []
    r = rendered[min(selected, len(rendered) - 1)]
    n = r.number
    detail = (f"{r.name} · confidence {n.confidence:.2f} · {len(n.digits)} digit(s) at threshold {threshold:.2f}"
              if n.text else f"{r.name} · no digit above threshold {threshold:.2f}")
    html = NUMBER_HTML.format(number=n.text or "?", detail=detail)
    digits = [[int(d), round(float(s), 3), [round(float(v), 1) for v in b]]
              for b, s, d in zip(n.digits.boxes, n.digits.scores, n.digits.digits)]
    # each drawing is encoded once (JPEG) and that file is shown and listed; the downloads are
    # written when asked for (prepare_downloads), and cleared here so they never lag the threshold
    folder = Path(tempfile.mkdtemp(prefix="digits_"))
    images = save_images(rendered, folder)
    shown = images[min(selected, len(rendered) - 1)]
    gallery = [(str(d), f"{x.name}: {x.number.text or '–'}") for x, d in zip(rendered, images)]
    table = [[x.name, x.image_id, x.number.text or "-1", round(x.number.confidence, 3)] for x in rendered]
    files = None
    regions = [[x.name, n.text or "-1", round(n.confidence, 3),
                "whole image" if g.whole else [round(float(v), 1) for v in g.box]]
               for x in rendered for g, n in x.reading.numbers(threshold)]
    overview = None
    if r.whole is not None:  # a whole photo: the one shown also with every number found marked
        overview = folder / f"{shown.stem}_photo.jpg"
        r.whole.save(overview, "JPEG", quality=90)
    whole = gr.update(value=None if overview is None else str(overview), visible=overview is not None)
    return session, str(shown), html, digits, gallery, table, files, note, whole, regions


def prepare_downloads(session: Session | None, threshold: float) -> list[str] | None:
    """``pred.json``, ``pred.csv`` and ``annotated.zip`` for what the session read, at ``threshold``."""
    rendered = (session or Session()).render(threshold)
    if not rendered:
        return None
    folder = Path(tempfile.mkdtemp(prefix="digits_"))
    return [str(p) for p in write_downloads(rendered, threshold, folder)]


def read_numbers(files, webcam, models, fusion, threshold, use_reader=True, multi_scale=False, finder=FINDER):
    """Run the chosen pipeline once on the uploads and keep its raw readings in the session; any
    failure becomes a message on the page, never Gradio's hidden error."""
    session = Session()
    try:
        paths = _paths(files)
        if len(paths) > MAX_IMAGES:
            session.errors.append(f"only the first {MAX_IMAGES} of {len(paths)} images are read")
            paths = paths[:MAX_IMAGES]
        sources, names = list(paths), [Path(p).name for p in paths]
        if webcam is not None:
            sources.append(webcam)
            names.append("camera.png")
        if sources:
            try:
                pipe = pipeline_for(models, fusion, use_reader, multi_scale, finder)
            except Exception as e:  # a broken or missing checkpoint: say so, don't crash the page
                session.errors.append(f"could not load {', '.join(models or [DEFAULT_MODEL])}: {e}")
                return _outputs(session, threshold)
            session.key = pipe.name
            readings = pipe.read(sources, names)
            session.keep(list(readings))
            session.errors += readings.errors
        return _outputs(session, threshold)
    except Exception as e:  # anything else: one readable line
        session.keep([])
        session.errors.append(f"could not read the images ({e.__class__.__name__}: {e})")
        return _outputs(session, threshold)


def rethreshold(session: Session | None, threshold: float):
    """Slider moved: re-filter the cached detections; never re-runs a model."""
    return _outputs(session or Session(), threshold)


def select_image(session: Session | None, threshold: float, evt: gr.SelectData):
    return _outputs(session or Session(), threshold, evt.index)


def explorer_plot(models: list[str] | None, fusion: str, use_reader: bool = True, multi_scale: bool = False):
    curves = sweep_curves()
    models = models or [DEFAULT_MODEL]
    reader = reading_with_reader(use_reader)
    groups = [[m] for m in models] + ([models] if len(models) > 1 else [])
    keys = [k for g in groups if (k := measured_key(config_for(g, fusion, reader, multi_scale), curves))]
    shown = {k: curves[k] for k in (keys or list(curves))}
    rows = [[k, r.threshold, round(r.mAP, 4), round(r.AP50, 4), round(r.accuracy, 4)] for k, v in shown.items()
            for r in [best(v)]]
    fig = plot_sweep(shown, title="Validation (300 SVHN images): accuracy and mAP vs threshold") if shown else None
    return fig, rows


def model_changed(models, fusion, use_reader=True, multi_scale=False):
    fig, rows = explorer_plot(models, fusion, use_reader, multi_scale)
    threshold = threshold_for(config_for(models, fusion, use_reader, multi_scale))
    return gr.update(value=threshold), fig, rows


def model_choices(use_reader: bool = True) -> list[tuple[str, str]]:
    """Dropdown entries labelled with each model's measured numbers, with or without the reader."""
    return [(model_label(n, reader=reading_with_reader(use_reader)), n) for n in available()]


def relabel_models(use_reader: bool):
    return gr.update(choices=model_choices(use_reader))


def build_demo() -> gr.Blocks:
    names = available()
    choices = model_choices(READER is not None)
    default = [DEFAULT_MODEL] if DEFAULT_MODEL in names else names[:1]
    with gr.Blocks(title="House-number reader") as demo:
        gr.Markdown("# House-number reader\nDrop photos of house numbers, crops or whole street photos: the number is "
                    "found, every digit boxed and the whole number read out. Models are trained from scratch on SVHN; "
                    "metrics are on 300 validation images.")
        session = gr.State(Session())
        with gr.Tab("Read numbers"):
            with gr.Row():
                with gr.Column(scale=2):
                    files = gr.File(label="Photos (drag and drop one or many)", file_count="multiple",
                                    type="filepath")  # no file_types: our own loader validates every upload
                    with gr.Accordion("Paste or webcam snapshot", open=False):
                        webcam = gr.Image(label="Snapshot", sources=["webcam", "clipboard"], type="numpy")
                    models = gr.Dropdown(choices, value=default, multiselect=True, label="Model(s): pick several for an ensemble")
                    fusion = gr.Radio([("weighted box fusion", "wbf"), ("digit vote", "vote"), ("class-aware NMS", "nms")],
                                      value=DEFAULT_FUSION,
                                      label="Ensemble fusion")
                    use_reader = gr.Checkbox(READER is not None, visible=READER is not None,
                                             label="Re-read each digit, then the whole number, with the second-stage readers (more accurate)")
                    multi_scale = gr.Checkbox(False, label="Multi-scale: also read at a larger size (finds more digits, ~2x slower)")
                    finder = gr.Radio(FINDERS, value=FINDER, label="Find the numbers with")
                    threshold = gr.Slider(0.05, 0.95, value=threshold_for(config_for(default, DEFAULT_FUSION)), step=0.01,
                                          label="Confidence threshold", elem_id="threshold")
                    run = gr.Button("Read numbers", variant="primary")
                    if EXAMPLES:
                        gr.Examples(EXAMPLES, inputs=[files], label="Examples: SVHN crops, and a whole photo (click one)")
                with gr.Column(scale=3):
                    number = gr.HTML(NUMBER_HTML.format(number="–", detail="no image yet"), elem_id="number")
                    annotated = gr.Image(label="Detected digits (in a whole photo: the number's region, zoomed in)",
                                         type="filepath", interactive=False, height=320)
                    whole = gr.Image(label="Whole photo: the numbers found", type="filepath", interactive=False, height=320,
                                     visible=False)
                    message = gr.Markdown(elem_id="message")
                    digits = gr.Dataframe(headers=["digit", "score", "box [x1, y1, x2, y2]"], label="Digits, left to right",
                                          interactive=False)
            gallery = gr.Gallery(label="All images (click to inspect)", columns=6, height=240, object_fit="contain")
            results = gr.Dataframe(headers=["file", "image_id", "number", "confidence"], label="Results", interactive=False)
            found = gr.Dataframe(headers=["file", "number", "confidence", "region [x1, y1, x2, y2]"],
                                 label="Every number found (a whole photo may hold several)", interactive=False)
            with gr.Row():
                prepare = gr.Button("Prepare downloads: pred.json, pred.csv, annotated.zip", size="sm")
                downloads = gr.File(label="Downloads", file_count="multiple")
        with gr.Tab("Threshold explorer"):
            gr.Markdown("Whole-number accuracy (solid) and COCO mAP (dashed) on the validation set at each threshold; "
                        "the dot marks the best threshold, which is also the slider's default.")
            plot = gr.Plot()
            best_table = gr.Dataframe(headers=["model", "best threshold", "mAP", "AP50", "accuracy"], interactive=False)

        outs = [session, annotated, number, digits, gallery, results, downloads, message, whole, found]
        inputs = [files, webcam, models, fusion, threshold, use_reader, multi_scale, finder]
        settings = [models, fusion, use_reader, multi_scale]
        run.click(read_numbers, inputs, outs, api_name="read_numbers")
        files.change(read_numbers, inputs, outs, api_name="read_uploads")
        webcam.change(read_numbers, inputs, outs, api_name="read_snapshot")
        threshold.change(rethreshold, [session, threshold], outs, api_name="rethreshold", show_progress="hidden")
        prepare.click(prepare_downloads, [session, threshold], [downloads], api_name="downloads")
        gallery.select(select_image, [session, threshold], outs, api_name="select_image")
        # a new model (or fusion) means new detections: re-read the current uploads with it
        for control, name in ((models, "model_settings"), (fusion, "fusion_settings"), (use_reader, "reader_settings"),
                              (multi_scale, "multi_scale_settings")):
            control.change(model_changed, settings, [threshold, plot, best_table], api_name=name).then(
                read_numbers, inputs, outs, api_name=f"{name}_reread")
        finder.change(read_numbers, inputs, outs, api_name="finder_reread")
        use_reader.change(relabel_models, [use_reader], [models], api_name="relabel_models", show_progress="hidden")
        demo.load(explorer_plot, settings, [plot, best_table], api_name="explorer")
    return demo


demo = build_demo()
demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    a = ap.parse_args()
    demo.launch(server_name=a.host, server_port=a.port, max_file_size="20mb", theme=gr.themes.Soft())
