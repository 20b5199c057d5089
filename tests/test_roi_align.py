from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from digit_demo.roi_align import multiscale_roi_align, use_fast_roi_align


def features(seed=0, n=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (str(i), torch.randn(n, 8, 32 // 2**i, 80 // 2**i, generator=g, dtype=dtype, requires_grad=True))
        for i in range(4)
    )


def boxes(seed=0, n=2, k=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(k, 2, generator=g) * torch.tensor([300.0, 120.0]) - 10  # some start outside the image
        wh = torch.rand(k, 2, generator=g) * torch.tensor([150.0, 100.0]) + 0.2  # some tiny
        out.append(torch.cat([xy, xy + wh], 1).to(dtype))
    return out


@pytest.mark.parametrize("sampling_ratio,dtype,tol", [
    (1, torch.float64, 1e-10), (2, torch.float64, 1e-10), (3, torch.float64, 1e-10), (2, torch.float32, 1e-4),
])
def test_matches_torchvision_forward_and_backward(sampling_ratio, dtype, tol):
    """Same numbers as torchvision's op: exact in float64, float rounding in float32."""
    feats_ref, feats_fast = features(dtype=dtype), features(dtype=dtype)
    b = boxes(dtype=dtype)
    ref = MultiScaleRoIAlign(list(feats_ref), 7, sampling_ratio)
    fast = use_fast_roi_align(ref)
    shapes = [(128, 320)] * 2
    out_ref, out_fast = ref(feats_ref, b, shapes), fast(feats_fast, b, shapes)
    assert out_fast.shape == out_ref.shape
    torch.testing.assert_close(out_fast, out_ref, atol=tol, rtol=tol)
    grad = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out_ref.backward(grad)
    out_fast.backward(grad)
    for a, r in zip(feats_fast.values(), feats_ref.values()):
        torch.testing.assert_close(a.grad, r.grad, atol=tol, rtol=tol)


def test_single_level_equals_roi_align():
    x = torch.randn(1, 4, 20, 30, dtype=torch.float64)
    rois = torch.tensor([[0, 2.0, 3.0, 17.5, 12.0], [0, -3.0, 0.0, 40.0, 25.0]], dtype=torch.float64)
    ours = multiscale_roi_align([x], rois, torch.zeros(2, dtype=torch.long), [0.5], (5, 4), 2)
    torch.testing.assert_close(ours, roi_align(x, rois, (5, 4), 0.5, 2), atol=1e-10, rtol=1e-10)


def test_no_rois():
    feats = features()
    fast = use_fast_roi_align(MultiScaleRoIAlign(list(feats), 7, 2))
    out = fast(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], [(128, 320)] * 2)
    assert out.shape == (0, 8, 7, 7)


def test_bfloat16_features_under_autocast_give_bfloat16_close_to_torchvision():
    """Training under bfloat16 autocast feeds bfloat16 features; the result is torchvision's float32 one, rounded."""
    feats = OrderedDict((k, v.detach().to(torch.bfloat16)) for k, v in features(dtype=torch.float32).items())
    b = boxes(dtype=torch.float32)
    ref = MultiScaleRoIAlign(list(feats), 7, 2)
    want = ref(OrderedDict((k, v.float()) for k, v in feats.items()), b, [(128, 320)] * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = use_fast_roi_align(ref)(feats, b, [(128, 320)] * 2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
