"""Running detectors: input-size views and multi-scale reading with the shipped default checkpoint."""
import numpy as np
import pytest
import torch

from digit_demo.checkpoints import load_checkpoint
from digit_demo.detect import MAX_ASPECT, Detector, letterbox, tiles, to_tensor
from digit_demo.ensemble import ensemble_key
from digit_demo.images import load_image
from digit_demo.pipeline import Pipeline, PipelineConfig
from digit_demo.assemble import assemble
from digit_demo.judge import read
from digit_demo.models import at_input_size, multi_scale_views, set_test_size
from digit_demo.inference import PRECISION_ENV, Bfloat16, ChannelsLastMaxPool2d, fast_pools, for_inference, has_amx, inference_precision

from .conftest import FIXTURES, raw_of

IMAGES = sorted((FIXTURES / "valid").glob("*.png"))


@torch.inference_mode()
def test_a_size_view_shares_weights_and_leaves_the_model_alone():
    model, _ = load_checkpoint("resnet18_fpn")
    model.eval()
    size = model.digit_config.test_size
    view = at_input_size(model, 2 * size, 1000)
    assert model.transform.test_size == size and view.transform.test_size == 2 * size
    assert all(a is b for a, b in zip(model.parameters(), view.parameters()))
    images = [to_tensor(load_image(p)) for p in IMAGES[:3]]
    out_view = view(images)
    reference, _ = load_checkpoint("resnet18_fpn")
    set_test_size(reference, 2 * size, 1000)
    for a, b, img in zip(out_view, reference.eval()(images), images):
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3) and torch.equal(a["labels"], b["labels"])
        if len(a["boxes"]):  # boxes come back in the photo's own pixels
            assert a["boxes"][:, 2].max() <= img.shape[2] + 1 and a["boxes"][:, 3].max() <= img.shape[1] + 1
    model_out = model(images)
    assert any(len(a["boxes"]) != len(b["boxes"]) or not torch.allclose(a["boxes"], b["boxes"])
               for a, b in zip(model_out, out_view))


def test_multi_scale_merges_the_readings_at_two_sizes(default_pipeline):
    one = default_pipeline.members[0]
    views = multi_scale_views(one.model)
    size = one.model.digit_config.test_size
    assert [v.transform.test_size for v in views] == [size, 8 * round(size * 1.15 / 8)]
    both = Detector(one.model, one.meta, reader=one.reader, multi_scale=True)
    merged = both(IMAGES)
    readings = [Detector(v, one.meta, reader=one.reader)(IMAGES) for v in views]
    for m, small, large in zip(merged, *readings):
        pool = np.concatenate([small.boxes, large.boxes])
        for box, score in zip(m.boxes, m.scores):  # every merged box is one of the two readings' own boxes
            assert np.abs(pool - box).max(1).min() < 1e-4
        top = max(small.scores.max(initial=0), large.scores.max(initial=0))
        assert m.scores.max(initial=0) == top  # class-aware NMS keeps the best
    assert any(len(m) > len(s) for m, s in zip(merged, readings[0]))  # the larger size adds detections
    assert both.name == "resnet18_fpn" and ensemble_key([both.name], "", multi_scale=True) == "resnet18_fpn (multi-scale)"
    assert ensemble_key(["a", "b"], "nms", reader=False, multi_scale=True) == "ensemble[nms](a+b) (detector only, multi-scale)"


def test_fast_pools_pool_exactly_as_max_pool2d():
    x = torch.randn(2, 5, 9, 13, generator=torch.Generator().manual_seed(0))
    for kw in ({"kernel_size": 3, "stride": 2, "padding": 1}, {"kernel_size": (2, 1)},
               {"kernel_size": 2, "ceil_mode": True}, {"kernel_size": (1, 1)}):
        net = fast_pools(torch.nn.Sequential(torch.nn.MaxPool2d(**kw), torch.nn.Sequential(torch.nn.MaxPool2d(**kw))))
        kind = torch.nn.Identity if kw == {"kernel_size": (1, 1)} else ChannelsLastMaxPool2d
        assert isinstance(net[0], kind) and isinstance(net[1][0], kind)  # nested pools are swapped too
        out = net(x)
        torch.testing.assert_close(out, torch.nn.MaxPool2d(**kw)(torch.nn.MaxPool2d(**kw)(x)), rtol=0, atol=0)
        assert out.is_contiguous()
    pool = ChannelsLastMaxPool2d(3, 2, 1)  # and a channels-last input stays channels-last
    assert pool(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def test_inference_preparation_keeps_every_models_outputs():
    from digit_demo.reader import load_reader
    from digit_demo.number_reader import load_number_reader

    images = [to_tensor(load_image(p)) for p in IMAGES[:4]]
    for name in ("resnet18_fpn", "mobilenet_v3_fpn"):
        plain, folded = load_checkpoint(name)[0], for_inference(load_checkpoint(name)[0], "fp32")
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        for a, b in zip(plain(images), folded(images)):
            assert len(a["boxes"]) == len(b["boxes"]) > 0
            torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=1e-4)
    crops = torch.rand(3, 3, 32, 128, generator=torch.Generator().manual_seed(0))
    for load, name, x in ((load_reader, "digit_reader", crops[..., :32]), (load_number_reader, "number_reader", crops),
                          (load_number_reader, "number_proposer", crops)):
        fast = for_inference(load(name), "fp32")
        assert not any(type(m) is torch.nn.MaxPool2d for m in fast.modules())
        torch.testing.assert_close(fast(x), load(name)(x), atol=1e-4, rtol=1e-4)
    body = Detector.load(precision="fp32").model.backbone.body  # what the library loads
    assert isinstance(body.bn1, torch.nn.Identity) and isinstance(body.maxpool, ChannelsLastMaxPool2d)


def test_inference_precision_follows_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert inference_precision() == inference_precision("auto") == ("bf16" if has_amx() else "fp32")
    assert inference_precision("fp32") == "fp32" and inference_precision("bf16") == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert inference_precision() == "fp32" and inference_precision("bf16") == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "half")
    try:
        inference_precision()
        raise AssertionError("an unknown precision must be refused")
    except ValueError as e:
        assert "auto, fp32, bf16" in str(e)


@torch.inference_mode()
def test_bfloat16_inference_reads_like_float32():
    """In bfloat16 the heavy parts run in bfloat16 behind float32 inputs and outputs, and the pipeline
    finds the same digits with close scores and reads the same numbers."""
    fp32, bf16 = Pipeline(PipelineConfig(precision="fp32")), Pipeline(PipelineConfig(precision="bf16"))
    model = bf16.members[0].model
    wrapped = [model.backbone, model.rpn.head, model.roi_heads.box_head, bf16.digit_reader.net[0],
               bf16.number_reader.cnn, bf16.number_reader.proposer.cnn]
    assert all(isinstance(m, Bfloat16) for m in wrapped)
    assert {p.dtype for m in wrapped for p in m.parameters()} == {torch.bfloat16}
    assert model.roi_heads.box_predictor.cls_score.weight.dtype == torch.float32
    assert not any(isinstance(m, Bfloat16) for m in fp32.members[0].model.modules())
    same = 0
    for fa, fb in zip(raw_of(fp32.read(IMAGES)), raw_of(bf16.read(IMAGES))):
        a, b = fa.detections, fb.detections
        assert b.scores.dtype == np.float32 and fb.line is not None and fb.line.log_probs.dtype == np.float32
        top_a, top_b = a.above(0.5), b.above(0.5)
        assert sorted(top_a.digits.tolist()) == sorted(top_b.digits.tolist())
        order_a, order_b = np.argsort(top_a.boxes[:, 0]), np.argsort(top_b.boxes[:, 0])
        assert np.abs(top_a.boxes[order_a] - top_b.boxes[order_b]).max(initial=0) < 2.0  # pixels
        assert np.abs(top_a.scores[order_a] - top_b.scores[order_b]).max(initial=0) < 0.05
        same += read(fa, 0.35).text == read(fb, 0.35).text
    assert same == len(IMAGES)


def test_letterbox_leaves_ordinary_photos_alone_and_fits_strips():
    photo = torch.rand(3, 60, 60 * 4)  # as wide as SVHN's widest
    same, scale = letterbox(photo, 341)
    assert same is photo and scale == 1.0
    strip = torch.rand(3, 8, 20000)
    boxed, scale = letterbox(strip, 341)
    assert scale == pytest.approx(341 / 20000)
    assert boxed.shape[2] == 341 and boxed.shape[1] == int(np.ceil(341 / MAX_ASPECT))  # padded to the widest aspect kept
    assert boxed[:, 1:].abs().max() == 0  # the padding is zeros, below the resized strip
    tall, _ = letterbox(torch.rand(3, 20000, 8), 341)
    assert tall.shape[1:] == (341, int(np.ceil(341 / MAX_ASPECT)))


def test_tiles_cover_the_strip_with_overlap():
    starts = tiles(1000, 10, 30)  # windows of 300 px
    assert starts[0] == 0 and starts[-1] == 700 and all(b - a <= 225 for a, b in zip(starts, starts[1:]))
    assert tiles(250, 10, 30) == [0]


@torch.inference_mode()
def test_strips_are_read_and_boxes_come_back_in_their_own_pixels(default_pipeline):
    """A photo at the left end of a 40 x 1 black strip is read in tiles as it is read alone, its boxes
    in the strip's pixels; strips too long to tile are letterboxed, and read without an error."""
    one = default_pipeline.members[0]
    image = to_tensor(load_image(IMAGES[0]))
    h, w = image.shape[1:]
    strip = torch.zeros(3, h, 40 * h)
    strip[:, :, :w] = image
    got, alone = one.detect_tensors([strip, image])
    top = got.above(0.3).boxes
    assert len(top) and (top[:, [0, 2]] <= w + 1).all()  # on the photo, not in the black
    assert assemble(got, 0.3).text == assemble(alone, 0.3).text != ""  # read in tiles as it reads alone
    for tall in (torch.zeros(3, 20000, 8), torch.zeros(3, 8, 20000)):
        found = one.detect_tensors([tall])[0]  # no digit, and no error
        assert found.boxes.shape[1] == 4


@pytest.mark.parametrize("value, expected", [("3", 3), ("", 7), (None, 7), (" 2", None), ("+2", None), ("0", None), ("1.5", None)])
def test_env_count_takes_digits_only(monkeypatch, value, expected):
    from digit_demo.detect import env_count

    if value is None:
        monkeypatch.delenv("DIGIT_DEMO_X", raising=False)
    else:
        monkeypatch.setenv("DIGIT_DEMO_X", value)
    if expected is None:
        with pytest.raises(ValueError, match=r"^DIGIT_DEMO_X='.*' is not a positive whole number$"):
            env_count("DIGIT_DEMO_X", 7)
    else:
        assert env_count("DIGIT_DEMO_X", 7) == expected
