"""Vectorised multi-scale RoIAlign for the CPU.

torchvision's CPU ``roi_align`` backward is a single-threaded scalar loop that dominates a
Faster R-CNN training step. Here RoIAlign (``aligned=False``, fixed ``sampling_ratio``) is written
as one sparse matrix over *all* pyramid levels at once: ``out = W @ features``, so the backward is
``W.T @ grad`` and both directions run as multi-threaded sparse-dense products. Results match
``torchvision.ops.roi_align`` to float rounding (see tests).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def _sample_weights(
    rois: Tensor, heights: Tensor, widths: Tensor, bases: Tensor, scales: Tensor,
    output_size: tuple[int, int], sampling_ratio: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, columns and values of the RoIAlign interpolation matrix.

    ``rois``: [K, 5] (batch index, x1, y1, x2, y2); per-RoI ``heights``/``widths`` of its feature
    map, ``bases``: offset of its image's map in the flattened features, ``scales``: spatial scale.
    """
    ph, pw = output_size
    g = sampling_ratio
    k = rois.shape[0]
    x1 = rois[:, 1] * scales
    y1 = rois[:, 2] * scales
    roi_w = (rois[:, 3] * scales - x1).clamp(min=1.0)
    roi_h = (rois[:, 4] * scales - y1).clamp(min=1.0)
    steps_y = (torch.arange(ph * g, dtype=rois.dtype) + 0.5) / g  # in bin units
    steps_x = (torch.arange(pw * g, dtype=rois.dtype) + 0.5) / g
    ys = y1[:, None] + steps_y[None] * (roi_h / ph)[:, None]  # [K, PH*g]
    xs = x1[:, None] + steps_x[None] * (roi_w / pw)[:, None]  # [K, PW*g]
    hh, ww = heights[:, None].to(rois.dtype), widths[:, None].to(rois.dtype)

    def axis(v: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        inside = (v >= -1.0) & (v <= size)
        v = v.clamp(min=0)
        low = v.floor()
        at_edge = low >= size - 1
        low = torch.where(at_edge, size - 1, low)
        v = torch.where(at_edge, low, v)
        high = torch.where(at_edge, low, low + 1)
        frac = v - low
        return low.long(), high.long(), 1 - frac, frac, inside

    y_lo, y_hi, wy_lo, wy_hi, y_in = axis(ys, hh)
    x_lo, x_hi, wx_lo, wx_hi, x_in = axis(xs, ww)
    w_int = widths[:, None, None]
    base = bases[:, None, None]
    count = float(g * g)
    idx, val = [], []
    for yy, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for xx, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            idx.append(base + yy[:, :, None] * w_int + xx[:, None, :])
            weight = wy[:, :, None] * wx[:, None, :] * (y_in[:, :, None] & x_in[:, None, :])
            val.append(weight / count)
    cols = torch.stack(idx, -1)  # [K, PH*g, PW*g, 4]
    vals = torch.stack(val, -1)
    out_y = torch.arange(ph * g) // g
    out_x = torch.arange(pw * g) // g
    rows = (torch.arange(k)[:, None, None] * ph * pw + out_y[None, :, None] * pw + out_x[None, None, :])
    rows = rows[..., None].expand_as(cols)
    return rows.reshape(-1), cols.reshape(-1), vals.reshape(-1)


def multiscale_roi_align(
    features: list[Tensor], rois: Tensor, levels: Tensor, scales: list[float],
    output_size: tuple[int, int], sampling_ratio: int,
) -> Tensor:
    """RoIAlign of ``rois`` ([K, 5]) on the level each is mapped to; returns [K, C, PH, PW]."""
    n, c = features[0].shape[:2]
    sizes = torch.tensor([f.shape[-2] * f.shape[-1] for f in features])
    level_start = torch.cumsum(sizes * n, 0) - sizes * n
    flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c) for f in features])
    hs = torch.tensor([f.shape[-2] for f in features])[levels]
    ws = torch.tensor([f.shape[-1] for f in features])[levels]
    bases = level_start[levels] + rois[:, 0].long() * sizes[levels]
    sc = torch.tensor(scales, dtype=rois.dtype)[levels]
    rows, cols, vals = _sample_weights(rois, hs, ws, bases, sc, output_size, sampling_ratio)
    k = rois.shape[0]
    matrix = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), vals.to(flat.dtype), (k * output_size[0] * output_size[1], flat.shape[0]),
        check_invariants=False,
    ).coalesce()
    out = torch.sparse.mm(matrix, flat)
    return out.reshape(k, output_size[0], output_size[1], c).permute(0, 3, 1, 2)


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """Drop-in ``MultiScaleRoIAlign`` that uses :func:`multiscale_roi_align` on the CPU."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        x_filtered = _filter_input(x, self.featmap_names)
        if x_filtered[0].device.type != "cpu" or self.sampling_ratio <= 0:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(x_filtered) > 1 else torch.zeros(len(rois), dtype=torch.long)
        if rois.shape[0] == 0:
            return x_filtered[0].new_zeros((0, x_filtered[0].shape[1], *self.output_size))
        return multiscale_roi_align(x_filtered, rois, levels.long(), self.scales, self.output_size, self.sampling_ratio)


def use_fast_roi_align(pool: MultiScaleRoIAlign) -> FastMultiScaleRoIAlign:
    """Return a fast copy of a torchvision ``MultiScaleRoIAlign`` (same settings, no weights)."""
    return FastMultiScaleRoIAlign(
        pool.featmap_names, pool.output_size, pool.sampling_ratio,
        canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level,
    )
