"""Merging several models' detections of one image: class-aware NMS or weighted box fusion."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from .assemble import Detections

FUSIONS = ("nms", "wbf")


def _concat(dets: list[Detections]) -> Detections:
    return Detections(
        np.concatenate([d.boxes for d in dets]).astype(np.float32).reshape(-1, 4),
        np.concatenate([d.scores for d in dets]).astype(np.float32),
        np.concatenate([d.digits for d in dets]).astype(np.int64),
    )


def nms_fusion(dets: list[Detections], iou: float = 0.55) -> Detections:
    """Pool all models' boxes and keep the best per digit (``batched_nms`` grouped by digit)."""
    allb = _concat(dets)
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
    allb = _concat(tagged)
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
    if not out_boxes:
        return Detections()
    result = Detections(np.stack(out_boxes).astype(np.float32), np.array(out_scores, np.float32), np.array(out_digits, np.int64))
    return result.select(np.argsort(-result.scores, kind="stable"))


def ensemble_key(models: list[str] | tuple[str, ...], fusion: str) -> str:
    """The name of a model or an ensemble, as benchmarks, sweeps and the app use it."""
    return models[0] if len(models) == 1 else f"ensemble[{fusion}]({'+'.join(models)})"


def member_weights(metas: list[dict], power: float = 2.0) -> list[float]:
    """WBF weights from each member's measured validation accuracy (``accuracy ** power``).

    On `valid` with epoch-1 members, squared-accuracy weights made WBF beat its best member on both
    mAP and accuracy where equal weights did not; with the shipped members it raises mAP but not
    accuracy (see the README benchmark). Members without a measured accuracy weigh 1.
    """
    accs = [m.get("metrics", {}).get("valid", {}).get("accuracy") for m in metas]
    if any(a is None or a <= 0 for a in accs):
        return [1.0] * len(metas)
    return [a**power for a in accs]


def fuse(dets: list[Detections], method: str = "wbf", iou: float = 0.55, weights: list[float] | None = None) -> Detections:
    """Fuse one image's detections from several models by ``method`` (``nms`` or ``wbf``; only
    ``wbf`` uses per-model ``weights``)."""
    if method == "nms":
        return nms_fusion(dets, iou)
    if method == "wbf":
        return weighted_box_fusion(dets, iou, weights)
    raise ValueError(f"unknown fusion {method!r}; choose one of {', '.join(FUSIONS)}")
