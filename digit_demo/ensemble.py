"""Merging several models' detections of one image: class-aware NMS, weighted box fusion, or a
class-agnostic digit vote."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from .checkpoints import measured
from .types import Detections

FUSIONS = ("vote", "wbf", "nms")
# With the digit reader re-reading every member's spots, weighted box fusion read at least as many `valid`
# numbers as the digit vote in every pair and trio of the shipped members at one input size, and had the
# best mAP of the three fusions (docs/experiments.md, "Ensembles").
DEFAULT_FUSION = "wbf"


def _by_score(boxes: list[np.ndarray], scores: list[float], digits: list[int]) -> Detections:
    """Fused boxes as :class:`Detections`, best score first."""
    if not boxes:
        return Detections()
    result = Detections(np.stack(boxes).astype(np.float32), np.array(scores, np.float32), np.array(digits, np.int64))
    return result.select(np.argsort(-result.scores, kind="stable"))


def nms_fusion(dets: list[Detections], iou: float = 0.55) -> Detections:
    """Pool all models' boxes and keep the best per digit (``batched_nms`` grouped by digit)."""
    allb = Detections.concat(dets)
    if not len(allb):
        return allb
    keep = batched_nms(torch.from_numpy(allb.boxes), torch.from_numpy(allb.scores), torch.from_numpy(allb.digits), iou)
    return allb.select(keep.numpy())


def weighted_box_fusion(dets: list[Detections], iou: float = 0.55, weights: list[float] | None = None) -> Detections:
    """Weighted box fusion (Solovyev et al., 2019) per digit.

    Boxes of one digit are clustered greedily by IoU with the cluster's fused box, in descending
    score order; a cluster's box is the score-weighted mean of its members, and its score their mean
    (model-weighted) score times ``min(members, N) / N``, so a box only one of N models found keeps
    1/N of its score.
    """
    n_models = len(dets)
    weights = [w / max(weights) for w in weights] if weights else [1.0] * n_models
    tagged = [Detections(d.boxes, d.scores * w, d.digits) for d, w in zip(dets, weights)]
    allb = Detections.concat(tagged)
    out_boxes, out_scores, out_digits = [], [], []
    for digit in np.unique(allb.digits):
        sel = allb.select(allb.digits == digit)
        order = np.argsort(-sel.scores, kind="stable")
        boxes, scores = sel.boxes[order], sel.scores[order]
        fused: list[np.ndarray] = []
        members: list[list[int]] = []
        for i in range(len(scores)):
            if fused:
                ious = box_iou(torch.from_numpy(boxes[i : i + 1]), torch.from_numpy(np.stack(fused)))[0].numpy()
                j = int(ious.argmax())
                if ious[j] > iou:
                    members[j].append(i)
                    w = scores[members[j]]
                    fused[j] = (boxes[members[j]] * w[:, None]).sum(0) / w.sum()
                    continue
            fused.append(boxes[i].copy())
            members.append([i])
        for box, m in zip(fused, members):
            out_boxes.append(box)
            out_scores.append(scores[m].mean() * min(len(m), n_models) / n_models)
            out_digits.append(digit)
    return _by_score(out_boxes, out_scores, out_digits)


def calibrate(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """Map scores monotonically so that a model's own best threshold lands on 0.5 (``s ** a``).

    Members differ in confidence (one model's 0.25 is another's 0.45); fusing calibrated scores
    lets each member speak on the same scale.
    """
    if not threshold or not 0 < threshold < 1:
        return scores
    return scores ** (np.log(0.5) / np.log(threshold))


def vote_fusion(dets: list[Detections], iou: float = 0.55, weights: list[float] | None = None,
                thresholds: list[float | None] | None = None) -> Detections:
    """Class-agnostic clustering, then a weighted digit vote per cluster.

    All members' boxes (scores calibrated by :func:`calibrate`) are clustered greedily by IoU, in
    descending score order, whatever digit they claim. In each cluster every member votes once per
    digit with its best score for it, weighted by its normalised weight; the winning digit's vote
    total is the fused score and its boxes' score-weighted mean is the fused box. Where members
    disagree on a digit, the weighted majority wins instead of both digits surviving side by side
    (as per-digit WBF and NMS leave them) and fighting it out in the reading.
    """
    n = len(dets)
    w = np.asarray(weights if weights else [1.0] * n, np.float64)
    w = w / w.sum()
    thresholds = thresholds or [None] * n
    allb = Detections.concat([Detections(d.boxes, calibrate(d.scores, t), d.digits) for d, t in zip(dets, thresholds)])
    if not len(allb):
        return allb
    member = np.concatenate([np.full(len(d), k) for k, d in enumerate(dets)])
    order = np.argsort(-allb.scores, kind="stable")
    allb, member = allb.select(order), member[order]
    overlap = box_iou(torch.from_numpy(allb.boxes), torch.from_numpy(allb.boxes)).numpy() > iou
    cluster = np.full(len(allb), -1)
    for i in range(len(allb)):
        if cluster[i] < 0:
            cluster[(cluster < 0) & overlap[i]] = i
            cluster[i] = i  # even a degenerate box (IoU with itself NaN) is its own cluster
    boxes, scores, digits = [], [], []
    for c in np.unique(cluster):
        idx = np.flatnonzero(cluster == c)
        best = np.zeros((n, 10))  # each member's best score per digit in this cluster
        np.maximum.at(best, (member[idx], allb.digits[idx]), allb.scores[idx])
        votes = w @ best
        digit = int(votes.argmax())
        won = idx[allb.digits[idx] == digit]
        s = allb.scores[won][:, None]
        boxes.append((allb.boxes[won] * s).sum(0) / s.sum())
        scores.append(votes[digit])
        digits.append(digit)
    return _by_score(boxes, scores, digits)


def ensemble_key(models: list[str] | tuple[str, ...], fusion: str, reader: bool = True, multi_scale: bool = False,
                 number_reader: bool = True, proposer: bool = True, fp32: bool = False) -> str:
    """The name of a model or an ensemble, as benchmarks, sweeps and the app use it; without the
    second-stage readers it is marked ``(detector only)``, with the digit reader alone ``(no number
    reader)``, with the number reader but not its proposer ``(no proposer)``, read at two input sizes
    ``(multi-scale)``, run in float32 where the default precision is another ``(fp32)``."""
    key = models[0] if len(models) == 1 else f"ensemble[{fusion}]({'+'.join(models)})"
    marks = (["detector only"] * (not reader) + ["no number reader"] * (reader and not number_reader)
             + ["no proposer"] * (reader and number_reader and not proposer) + ["multi-scale"] * multi_scale
             + ["fp32"] * fp32)
    return f"{key} ({', '.join(marks)})" if marks else key


def member_weights(metas: list[dict], power: float = 2.0) -> list[float]:
    """Fusion weights from each member's measured validation accuracy (``accuracy ** power``).

    Squared-accuracy weights read more `valid` numbers than equal or linear ones (docs/experiments.md,
    "Ensembles"): the stronger member is not outvoted by two weak ones. Members without a measured
    accuracy weigh 1.
    """
    accs = [measured(m, "valid").get("accuracy") for m in metas]
    if any(a is None or a <= 0 for a in accs):
        return [1.0] * len(metas)
    return [a**power for a in accs]


def member_threshold(meta: dict, multi_scale: bool = False) -> float | None:
    """A member's best threshold on valid (its sidecar's ``threshold``), read at two input sizes where it
    runs so (``metrics.valid_multi_scale``, where measured)."""
    at_two = measured(meta, "valid_multi_scale").get("threshold") if multi_scale else None
    return at_two if at_two is not None else meta.get("threshold")


def fuse(dets: list[Detections], method: str = DEFAULT_FUSION, iou: float = 0.55, weights: list[float] | None = None,
         thresholds: list[float | None] | None = None) -> Detections:
    """Fuse one image's detections from several models by ``method`` (``vote``, ``wbf`` or ``nms``;
    ``vote`` and ``wbf`` use per-model ``weights``, ``vote`` also each model's best ``thresholds``)."""
    if method == "nms":
        return nms_fusion(dets, iou)
    if method == "wbf":
        return weighted_box_fusion(dets, iou, weights)
    if method == "vote":
        return vote_fusion(dets, iou, weights, thresholds)
    raise ValueError(f"unknown fusion {method!r}; choose one of {', '.join(FUSIONS)}")
