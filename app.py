"""Gradio demo: drop house-number photos, pick a detector or an ensemble, move the threshold."""
from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import gradio as gr

from digit_demo.card import best_threshold, measured_key, model_label, sweep_curves
from digit_demo.checkpoints import DEFAULT_MODEL, available
from digit_demo.detect import Detector, Ensemble, set_threads, to_tensor
from digit_demo.ensemble import DEFAULT_FUSION
from digit_demo.evaluation import best, plot_sweep
from digit_demo.images import ImageError, load_image
from digit_demo.io import image_id_for
from digit_demo.reader import optional_reader
from digit_demo.sequence import optional_number_reader
from digit_demo.session import Item, Session, write_downloads

EXAMPLES = sorted(str(p) for p in (Path(__file__).parent / "examples").glob("*.png"))
MAX_IMAGES = 32
THREADS = int(os.environ.get("DIGIT_DEMO_THREADS", "2"))
set_threads(THREADS)

_detectors: dict[str, Detector] = {}
_lock = threading.Lock()
READER = optional_reader()  # the shipped second-stage digit reader, if any
NUMBER_READER = optional_number_reader()  # and the whole-number reader, which works with it


def reading_with_reader(use_reader: bool) -> bool:
    """Whether the reader checkbox's setting puts the digit reader to work (it must be shipped)."""
    return bool(use_reader) and READER is not None


def detector_for(models: tuple[str, ...], fusion: str, use_reader: bool = True, multi_scale: bool = False):
    """Models load once and are shared by every visitor; the second-stage readers (each digit, then
    the whole number) and multi-scale reading are applied on request."""
    with _lock:
        for m in models:
            if m not in _detectors:
                _detectors[m] = Detector.load(m, reader=None, number_reader=None)
    reader, lines = (READER, NUMBER_READER) if use_reader else (None, None)
    members = [Detector(_detectors[m].model, _detectors[m].meta, reader=reader, multi_scale=multi_scale,
                        number_reader=lines) for m in models]
    return members[0] if len(members) == 1 else Ensemble(members, fusion)


def _paths(files) -> list[str]:
    if not files:
        return []
    files = files if isinstance(files, list) else [files]
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]


NUMBER_HTML = """<div style="text-align:center;padding:8px 0">
<div style="font-size:64px;font-weight:700;letter-spacing:6px;line-height:1.1">{number}</div>
<div style="font-size:14px;opacity:.75">{detail}</div></div>"""


def _outputs(session: Session, threshold: float, selected: int = 0):
    readings = session.render(threshold)
    note = "\n".join(f"⚠️ {e}" for e in session.errors)
    if not readings:
        empty = NUMBER_HTML.format(number="–", detail="no image yet" if not session.errors else "no readable image")
        return session, None, empty, [], [], [], None, note
    r = readings[min(selected, len(readings) - 1)]
    n = r.number
    detail = (f"{r.item.name} · confidence {n.confidence:.2f} · {len(n.digits)} digit(s) at threshold {threshold:.2f}"
              if n.text else f"{r.item.name} · no digit above threshold {threshold:.2f}")
    html = NUMBER_HTML.format(number=n.text or "?", detail=detail)
    digits = [[int(d), round(float(s), 3), [round(float(v), 1) for v in b]]
              for b, s, d in zip(n.digits.boxes, n.digits.scores, n.digits.digits)]
    gallery = [(x.annotated, f"{x.item.name}: {x.number.text or '–'}") for x in readings]
    table = [[x.item.name, x.item.image_id, x.number.text or "-1", round(x.number.confidence, 3)] for x in readings]
    files = [str(p) for p in write_downloads(readings, threshold)]
    return session, r.annotated, html, digits, gallery, table, files, note


def read_numbers(files, webcam, models, fusion, threshold, use_reader=True, multi_scale=False):
    """Run the chosen model(s) once on the uploads and cache the raw detections."""
    models = tuple(models or [DEFAULT_MODEL])
    session = Session(models=models, fusion=fusion)
    images, names = [], []
    paths = _paths(files)
    if len(paths) > MAX_IMAGES:
        session.errors.append(f"only the first {MAX_IMAGES} of {len(paths)} images are read")
        paths = paths[:MAX_IMAGES]
    for p in paths:
        name = Path(p).name
        try:
            images.append(load_image(p, name=name))
            names.append(name)
        except ImageError as e:
            session.errors.append(str(e))
    if webcam is not None:
        try:
            images.append(load_image(webcam, name="camera"))
            names.append("camera.png")
        except ImageError as e:
            session.errors.append(str(e))
    if images:
        try:
            detector = detector_for(models, fusion, use_reader, multi_scale)
        except Exception as e:  # a broken or missing checkpoint: say so, don't crash the page
            session.errors.append(f"could not load {', '.join(models)}: {e}")
            return _outputs(session, threshold)
        raw = detector.detect_tensors([to_tensor(im) for im in images])
        session.items = [Item(n, image_id_for(Path(n), k), im, d) for k, (n, im, d) in enumerate(zip(names, images, raw), 1)]
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
    keys = [k for g in groups if (k := measured_key(g, fusion, reader, multi_scale, curves))]
    shown = {k: curves[k] for k in (keys or list(curves))}
    rows = [[k, r.threshold, round(r.mAP, 4), round(r.AP50, 4), round(r.accuracy, 4)] for k, v in shown.items()
            for r in [best(v)]]
    fig = plot_sweep(shown, title="Validation (300 SVHN images): accuracy and mAP vs threshold") if shown else None
    return fig, rows


def model_changed(models, fusion, use_reader=True, multi_scale=False):
    fig, rows = explorer_plot(models, fusion, use_reader, multi_scale)
    threshold = best_threshold(models, fusion, reading_with_reader(use_reader), multi_scale)
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
        gr.Markdown("# House-number reader\nDrop street photos of house numbers: every digit is boxed and the whole "
                    "number read out. Models are Faster R-CNN detectors trained from scratch on SVHN; metrics are on "
                    "300 validation images.")
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
                    threshold = gr.Slider(0.05, 0.95, value=best_threshold(default, reader=READER is not None), step=0.01,
                                          label="Confidence threshold", elem_id="threshold")
                    run = gr.Button("Read numbers", variant="primary")
                    if EXAMPLES:
                        gr.Examples(EXAMPLES, inputs=[files], label="Real SVHN examples (click one)")
                with gr.Column(scale=3):
                    number = gr.HTML(NUMBER_HTML.format(number="–", detail="no image yet"), elem_id="number")
                    annotated = gr.Image(label="Detected digits", type="pil", interactive=False, height=320)
                    message = gr.Markdown(elem_id="message")
                    digits = gr.Dataframe(headers=["digit", "score", "box [x1, y1, x2, y2]"], label="Digits, left to right",
                                          interactive=False)
            gallery = gr.Gallery(label="All images (click to inspect)", columns=6, height=240, object_fit="contain")
            results = gr.Dataframe(headers=["file", "image_id", "number", "confidence"], label="Results", interactive=False)
            downloads = gr.File(label="Downloads: pred.json, pred.csv, annotated.zip", file_count="multiple")
        with gr.Tab("Threshold explorer"):
            gr.Markdown("Whole-number accuracy (solid) and COCO mAP (dashed) on the validation set at each threshold; "
                        "the dot marks the best threshold, which is also the slider's default.")
            plot = gr.Plot()
            best_table = gr.Dataframe(headers=["model", "best threshold", "mAP", "AP50", "accuracy"], interactive=False)

        outs = [session, annotated, number, digits, gallery, results, downloads, message]
        inputs = [files, webcam, models, fusion, threshold, use_reader, multi_scale]
        settings = [models, fusion, use_reader, multi_scale]
        run.click(read_numbers, inputs, outs, api_name="read_numbers")
        files.change(read_numbers, inputs, outs, api_name="read_uploads")
        webcam.change(read_numbers, inputs, outs, api_name="read_snapshot")
        threshold.change(rethreshold, [session, threshold], outs, api_name="rethreshold", show_progress="hidden")
        gallery.select(select_image, [session, threshold], outs, api_name="select_image")
        # a new model (or fusion) means new detections: re-read the current uploads with it
        for control, name in ((models, "model_settings"), (fusion, "fusion_settings"), (use_reader, "reader_settings"),
                              (multi_scale, "multi_scale_settings")):
            control.change(model_changed, settings, [threshold, plot, best_table], api_name=name).then(
                read_numbers, inputs, outs, api_name=f"{name}_reread")
        use_reader.change(relabel_models, [use_reader], [models], api_name="relabel_models", show_progress="hidden")
        demo.load(explorer_plot, settings, [plot, best_table], api_name="explorer")
    return demo


demo = build_demo()
demo.queue(default_concurrency_limit=2, max_size=32)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    a = ap.parse_args()
    demo.launch(server_name=a.host, server_port=a.port, max_file_size="20mb", theme=gr.themes.Soft())
