"""PP-OCR's text detector and recognizer (the ONNX models inside the ``rapidocr`` wheel, run by
onnxruntime on the CPU, offline): where a photo holds text and what it says. The locate stage uses it to
find the lines that hold digits (:class:`TextFinder`); each such line's digits are also a reading the
judge weighs against the readers' (:func:`digit_demo.judge.by_text`)."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import CHECKPOINT_DIR, CheckpointError, read_sidecar, tuned

PPOCR = "ppocr"  # the locator name that selects this stage
SIDECAR = "ppocr.json"  # this stage's settings in a checkpoint folder (the models are the wheel's ONNX)
ARCHITECTURE = "ppocr_text_lines"


def available() -> bool:
    """Whether the packages PP-OCR runs on (``rapidocr``, ``onnxruntime``) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("rapidocr", "onnxruntime"))


@dataclass(frozen=True)
class TextSettings:
    """How PP-OCR's lines become regions, each value chosen on real_dev (real photos) unless said
    (docs/experiments.md):

    - ``det_side``: the detector reads the photo shrunk to this long side (Det.limit_type "max"): PP-OCR
      alone read 0.924 of real_dev at side 640 (p50 208 ms on 2 cores), against 0.898 and 493 ms with the
      package's defaults (short side 736); the whole pipeline read real_dev at sides 448 / 480 / 512 / 544 /
      576 / 640: 107 / 109 / 112 / 110 / 109 / 110 of 118 photos, p50 211 / 227 / 237 / 262 / 263 / 284 ms
      (the SVHN tuning split: 272 of 300 at 512 and 640). Where it finds no digit line, it looks again at
      ``retry_side`` (real_dev at side 640: 0.898 → 0.907, e.g. a lone "3" at 2% of the photo's height);
    - ``pad``: a line is read from a crop padded by these shares of its height (x, y);
    - ``crop_share``: where the first digit line is at least this share of the height of a photo up to
      ``settle_side`` on its short side, the number fills the photo (an SVHN-like crop) and the photo is
      read whole, as today's readers read best; a larger photo is read line by line (300 composite scenes
      of the tuning split: 250 read with such photos read whole, 251 line by line; real_dev 112 of 118
      either way);
    - ``min_score`` / ``min_score_whole``: how sure PP-OCR must be to overrule the readers in a line's
      region, or in a photo up to ``settle_side`` on its short side read whole (an SVHN-like crop; where
      the readers misread a stack or a letter suffix: ``min_score``). ``min_score_whole`` was chosen on
      the SVHN tuning split (0.8 / 0.85 / 0.9 / 0.95: 0.897 / 0.903 / 0.903 / 0.907, at side 640;
      real_dev, which reports it: 0.941 / 0.941 / 0.932 / 0.932);
    - ``settle`` / ``settle_share``: the readers read each photo whole first, and their number stands
      without PP-OCR where it is at least ``settle`` sure and its tallest digit at least ``settle_share``
      of the photo's height (an SVHN-like crop; None: PP-OCR looks at every photo). ``settle`` was chosen
      on the SVHN tuning split (0.5 / 0.7 / 0.8 / 0.85-0.9 / 0.95: 0.910 / 0.910 / 0.913 / 0.917 / 0.913
      of its 300 photos, against 0.907 with PP-OCR on every photo), the lowest of the tied bars, which
      settles the most photos (188 of 300 at 0.85, 132 at 0.9: a `valid` crop's p50 44 against 62 ms,
      36 with the readers alone, 2 cores, fp32), ``settle_share`` on real_dev (the tuning
      split reads the same at 0.2 and 0.3; real_dev loses 2 photos at 0.2, where the readers read a
      plaque's "502A" as "50" and "205" as "20", 0.92-0.97 sure, with digits at 21-23% of the height);
    - ``join_below``: where no digit line PP-OCR finds is at least this sure, the CNN locator's regions
      join its lines' (those that overlap none of them), as they replace them where it finds no digit line
      (None: only there). Chosen on 300 composite scenes of the SVHN tuning split's crops (None / 0.8 /
      0.9 / joining always: 251 / 254 / 254 / 254 read, the lowest tied bar adding the fewest regions;
      real_dev, which reports it: 112 of 118 each way measured). PP-OCR's detector misses some small, blurred numbers at any side up to 1600 px and boxes a patch
      of texture as a "1" instead, where the CNN locator, trained on such scenes, finds them;
    - ``settle_side``: only photos up to this short side are read whole first (every SVHN photo: at most
      273 px tall), and only those are read whole where a line fills ``crop_share`` of them: a larger photo
      goes to PP-OCR at once, which reads it line by line. The readers' whole-photo pass costs 28 ms at p50 on
      real_dev's photos up to 512 px on their long side, 61 ms at 800-1100 px and 176 ms on the 2-3 MP
      composite scenes (2 cores, fp32). Bounding the long side at 512 instead cost the tuning split a
      wide photo (0.913 against 0.917)."""

    det_side: int = 512
    retry_side: int | None = 960
    pad: tuple[float, float] = (0.5, 0.3)
    crop_share: float = 0.2
    min_score: float = 0.5
    min_score_whole: float = 0.95
    settle: float | None = 0.85
    settle_share: float = 0.3
    settle_side: int = 512
    join_below: float | None = 0.8

    def crop_sized(self, size: tuple[int, int]) -> bool:
        """Whether a photo of ``size`` (width, height) is no larger than an SVHN-like crop: its short
        side at most ``settle_side``. Such a photo is read whole first, and PP-OCR's reading of it whole
        must reach ``min_score_whole``."""
        return min(size) <= self.settle_side


# Where each default of TextSettings was chosen (docs/experiments.md); a release's sidecar says anew
# for what it tunes (train.calibrate chooses ``settle`` on the tuning split).
CHOSEN_ON = {
    "det_side": "real_dev", "retry_side": "real_dev", "pad": "not tuned", "crop_share": "not tuned",
    "min_score": "not tuned (composite scenes and real_dev read alike from 0.5 to 0.9)",
    "min_score_whole": "SVHN tuning split", "settle": "SVHN tuning split", "settle_share": "real_dev",
    "settle_side": "cost on real_dev and the composite scenes; larger photos read line by line: composite scenes of the SVHN tuning split",
    "join_below": "composite scenes of the SVHN tuning split",
}


def text_settings(directory: Path | None = None) -> TextSettings:
    """The locate stage's settings: the ``tuned`` block of ``directory``'s ``ppocr.json`` (default the
    checkpoint folder; written by :func:`write_sidecar`) where it has one, else the defaults. A
    sidecar of another stage, or a setting that :class:`TextSettings` lacks, is a CheckpointError."""
    side = Path(directory or CHECKPOINT_DIR) / SIDECAR
    if not side.is_file():
        return TextSettings()
    meta = read_sidecar(side)
    if meta["architecture"] != ARCHITECTURE:
        raise CheckpointError(f"{side}: sidecar is for {meta['architecture']!r}, not the {ARCHITECTURE!r} stage")
    return tuned(meta, TextSettings)


def write_sidecar(directory: Path, settings: TextSettings, chosen_on: dict[str, str] | None = None,
                  tuning: dict | None = None) -> Path:
    """``directory/ppocr.json``: the package whose ONNX models this stage runs, ``settings`` and where
    each was chosen (:data:`CHOSEN_ON`, updated by ``chosen_on``), and the ``tuning`` rows behind them."""
    version = importlib.metadata.version("rapidocr") if available() else None
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    meta = {"name": SIDECAR.removesuffix(".json"), "architecture": ARCHITECTURE,
            "config": {"package": "rapidocr", "version": version, "models": "the wheel's PP-OCR detector and recognizer (ONNX)",
                       "use_cls": False},
            "tuned": {**values, "chosen_on": {**CHOSEN_ON, **(chosen_on or {})}}}
    if tuning:
        meta["tuning"] = tuning
    path = Path(directory) / SIDECAR
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class TextLine:
    """A line of text PP-OCR found: its axis-aligned ``box`` (xyxy, photo pixels), what it reads
    (``text``) and how sure the recognizer is (``score``)."""

    box: tuple[float, float, float, float]
    text: str
    score: float
    stack: bool = False  # one-digit lines joined top to bottom (:func:`number_lines`)

    @property
    def digits(self) -> str:
        """The line's longest run of digits ("" where it has none): "1502A" reads "1502"."""
        return max(re.findall(r"\d+", self.text), key=len, default="")


class TextFinder:
    """PP-OCR detection and recognition of a whole photo (:meth:`lines`), loaded once and safe to
    call from several threads, with ``settings`` (default: the checkpoint folder's, :func:`text_settings`);
    onnxruntime runs on ``threads`` (default: torch's, which ``$DIGIT_DEMO_THREADS`` and ``--threads`` set). Raises ImportError where its packages are not
    installed (:func:`available`)."""

    def __init__(self, settings: TextSettings | None = None, threads: int | None = None):
        if not available():  # fail here, not on the first photo
            raise ImportError("PP-OCR needs the rapidocr and onnxruntime packages (pip install -r requirements.txt)")

        self.settings = settings = settings or text_settings()
        self.threads = threads or torch.get_num_threads()
        self._engines: dict[int, object] = {}
        self._lock = threading.Lock()

    def _engine(self, side: int):
        """The PP-OCR engine whose detector reads photos at ``side`` px on their long side (loaded once)."""
        if side not in self._engines:
            from rapidocr import RapidOCR  # imported here: only this locator needs the package

            # no angle classifier: it turned right-way-up lines over (real_dev and `valid`: 9 of 418 photos'
            # first digit line changed, 7 of them to the right number without it) and cost 16 ms a crop
            self._engines[side] = RapidOCR(params={
                "Global.log_level": "error", "Global.use_cls": False, "Det.limit_type": "max", "Det.limit_side_len": side,
                "EngineConfig.onnxruntime.intra_op_num_threads": self.threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1})
            _without_spinning(self._engines[side], self.threads)
        return self._engines[side]

    def lines(self, image: Image.Image) -> list[TextLine]:
        """Every line of text in ``image`` (RGB), most confident first: read at ``det_side``, and again at
        ``retry_side`` where no line holds a digit and the photo is larger than ``det_side``."""
        found = self._lines(image, self.settings.det_side)
        if self.settings.retry_side and max(image.size) > self.settings.det_side and not any(t.digits for t in found):
            found = self._lines(image, self.settings.retry_side)
        return found

    def _lines(self, image: Image.Image, side: int) -> list[TextLine]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        with self._lock:  # one onnxruntime session per model: one photo at a time
            out = self._engine(side)(bgr)
        if out.boxes is None or not out.txts:
            return []
        found = []
        for quad, text, score in zip(np.asarray(out.boxes, np.float32), out.txts, out.scores):
            box = (float(quad[:, 0].min()), float(quad[:, 1].min()), float(quad[:, 0].max()), float(quad[:, 1].max()))
            found.append(TextLine(box, str(text), float(score)))
        return sorted(found, key=lambda t: t.score, reverse=True)


def _without_spinning(engine, threads: int) -> None:
    """Load ``engine``'s detector and recognizer with onnxruntime's idle threads sleeping, not spinning:
    left spinning after each call, they take the cores from the torch stages that run next (an SVHN
    crop, 2 cores: the readers 71 → 40 ms, PP-OCR 50 → 32 ms). rapidocr (pinned) builds its sessions
    without that option, so each is rebuilt from the same model file with it."""
    import onnxruntime as ort

    for part in (engine._load_det_model(), engine._load_rec_model()):
        built = part.session.session
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 4
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        part.session.session = ort.InferenceSession(built._model_path, sess_options=options,
                                                    providers=["CPUExecutionProvider"])


def number_lines(lines: list[TextLine]) -> list[TextLine]:
    """The lines that may be house numbers: those holding digits, with a vertical stack of one-digit
    lines (each below the last, overlapping it sideways) joined into one line read top to bottom."""
    digit_lines = [t for t in lines if t.digits]
    singles = sorted((t for t in digit_lines if len(t.digits) == 1 and len(t.text.strip()) == 1), key=lambda t: t.box[1])
    stacks: list[list[TextLine]] = []
    for t in singles:
        last = stacks[-1][-1] if stacks else None
        if last is not None and _stacked(last, t):
            stacks[-1].append(t)
        else:
            stacks.append([t])
    joined = [TextLine((min(t.box[0] for t in s), s[0].box[1], max(t.box[2] for t in s), s[-1].box[3]),
                       "".join(t.digits for t in s), float(np.prod([t.score for t in s])), stack=True)
              for s in stacks if len(s) > 1]
    used = {id(t) for s in stacks if len(s) > 1 for t in s}
    return sorted([t for t in digit_lines if id(t) not in used] + joined, key=lambda t: t.score, reverse=True)


def _stacked(upper: TextLine, lower: TextLine) -> bool:
    """Whether ``lower`` sits right under ``upper`` (a gap under one line height, overlapping sideways)."""
    h = upper.box[3] - upper.box[1]
    gap = lower.box[1] - upper.box[3]
    overlap = min(upper.box[2], lower.box[2]) - max(upper.box[0], lower.box[0])
    return -0.5 * h <= gap <= h and overlap > 0.3 * min(upper.box[2] - upper.box[0], lower.box[2] - lower.box[0])
