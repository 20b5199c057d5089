"""Model registry: Faster R-CNN digit detectors built by name, offline, from scratch.

Every model has 11 classes (0 = background, ``k + 1`` = digit ``k``), is built with
``weights=None, weights_backbone=None`` (no download ever), a small input size suited to SVHN
photos, anchors shaped like digits (taller than wide), heads sized for a handful of objects, and the
vectorised CPU RoIAlign of :mod:`digit_demo.roi_align`.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import detection, resnet18, resnet34
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .roi_align import use_fast_roi_align

NUM_CLASSES = 11
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Digits are taller than wide: SVHN box height/width spans ~1.3-4 (median 2). AnchorGenerator's
# aspect ratio is height / width.
DIGIT_ASPECT_RATIOS = (1.3, 2.0, 3.0)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in each checkpoint's sidecar."""

    architecture: str
    min_size: int | tuple[int, ...] = 128
    max_size: int = 320
    test_size: int | None = None  # short side at inference (None: the last min_size), chosen on valid
    test_max_size: int | None = None
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    aspect_ratios: tuple[float, ...] = DIGIT_ASPECT_RATIOS
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    # RPN proposals kept at inference: per level before NMS, in all after. On valid, resnet18_fpn read as
    # many numbers with 100 / 50 as with 300 / 100, about 5 ms faster per image on 2 cores.
    rpn_pre_nms_top_n_test: int = 100
    rpn_post_nms_top_n_test: int = 50
    box_batch_size_per_image: int = 128
    box_detections_per_img: int = 40
    box_score_thresh: float = 0.01  # raw score floor: any higher threshold is applied later
    box_nms_thresh: float = 0.5
    fpn_channels: int = 256  # custom ResNet-FPN variants only
    representation_size: int = 1024  # custom ResNet-FPN variants only
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        for key in ("image_mean", "image_std", "anchor_sizes", "aspect_ratios"):
            if key in d:
                d[key] = tuple(d[key])
        if isinstance(d.get("min_size"), list):
            d["min_size"] = tuple(d["min_size"])
        return cls(**d)

    @property
    def train_size(self) -> int:
        """The last (largest-listed) training short side: torchvision's own inference size."""
        return self.min_size[-1] if isinstance(self.min_size, tuple) else self.min_size

    def max_size_for(self, size: int) -> int:
        """The long-side cap for inference at short side ``size``: the training cap, scaled alike."""
        return round(self.max_size * size / self.train_size)

    def detector_kwargs(self) -> dict:
        return dict(
            num_classes=NUM_CLASSES, min_size=self.min_size, max_size=self.max_size,
            image_mean=list(self.image_mean), image_std=list(self.image_std),
            rpn_pre_nms_top_n_train=self.rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=self.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=self.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=self.rpn_post_nms_top_n_test,
            box_batch_size_per_image=self.box_batch_size_per_image,
            box_detections_per_img=self.box_detections_per_img,
            box_score_thresh=self.box_score_thresh, box_nms_thresh=self.box_nms_thresh,
        )


def _torchvision(builder: Callable) -> Callable[[ModelConfig], FasterRCNN]:
    def build(cfg: ModelConfig) -> FasterRCNN:
        return builder(weights=None, weights_backbone=None, **cfg.detector_kwargs())
    return build


def _resnet_fpn(trunk: Callable, returned_layers: list[int]) -> Callable[[ModelConfig], FasterRCNN]:
    def build(cfg: ModelConfig) -> FasterRCNN:
        body = trunk(weights=None, norm_layer=nn.BatchNorm2d)
        stage_channels = body.inplanes // 8  # channels of layer1 (BasicBlock ResNets)
        backbone = BackboneWithFPN(
            body, {f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
            [stage_channels * 2 ** (k - 1) for k in returned_layers], cfg.fpn_channels,
            extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d,
        )
        box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation_size)
        predictor = FastRCNNPredictor(cfg.representation_size, NUM_CLASSES)
        levels = len(returned_layers) + 1  # + the FPN's max-pool level
        placeholder = AnchorGenerator(((32,),) * levels, ((0.5, 1.0, 2.0),) * levels)  # replaced in build_model
        kwargs = cfg.detector_kwargs()
        kwargs.pop("num_classes")
        return FasterRCNN(
            backbone, rpn_anchor_generator=placeholder, box_head=box_head, box_predictor=predictor, **kwargs
        )
    return build


# name -> (builder, default config overrides)
ARCHITECTURES: dict[str, tuple[Callable[[ModelConfig], FasterRCNN], dict]] = {
    "fasterrcnn_resnet50_fpn_v2": (_torchvision(detection.fasterrcnn_resnet50_fpn_v2), {}),
    "fasterrcnn_resnet50_fpn": (_torchvision(detection.fasterrcnn_resnet50_fpn), {}),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        _torchvision(detection.fasterrcnn_mobilenet_v3_large_fpn),
        {"min_size": 160, "max_size": 400, "anchor_sizes": (24, 48, 96, 192, 384)},
    ),
    "fasterrcnn_resnet18_fpn": (
        _resnet_fpn(resnet18, [2, 3, 4]),
        {"anchor_sizes": (24, 48, 96, 192), "fpn_channels": 128, "representation_size": 512},
    ),
    "fasterrcnn_resnet34_fpn": (
        _resnet_fpn(resnet34, [2, 3, 4]),
        {"anchor_sizes": (24, 48, 96, 192), "fpn_channels": 128, "representation_size": 512},
    ),
}


def default_config(architecture: str, **overrides) -> ModelConfig:
    """The registry's default config for ``architecture``, with ``overrides`` applied."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ModelConfig(**{"architecture": architecture, **ARCHITECTURES[architecture][1], **overrides})


def _anchor_generator(cfg: ModelConfig, num_levels: int, per_level: int) -> AnchorGenerator:
    """Digit-shaped anchors with the same number per location as the stock RPN head expects."""
    if per_level == len(cfg.aspect_ratios):  # one size per level (FPN on ResNets)
        sizes = tuple((s,) for s in cfg.anchor_sizes[:num_levels])
        if len(sizes) != num_levels:
            raise ValueError(f"{cfg.architecture} needs {num_levels} anchor sizes, got {cfg.anchor_sizes}")
    else:  # every size on every level (MobileNetV3-FPN)
        sizes = (tuple(cfg.anchor_sizes),) * num_levels
    generator = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * num_levels)
    if generator.num_anchors_per_location()[0] != per_level:
        raise ValueError(f"{cfg.architecture}: anchors per location must stay {per_level}")
    return generator


class DigitTransform(GeneralizedRCNNTransform):
    """torchvision's resize-and-normalise, with its own input size at inference (``test_size``).

    Training samples the short side from ``min_size``; torchvision would infer at the last of them.
    A model trained on small, multi-scale inputs can read better a little larger, so the inference
    size is a separate, measured setting.
    """

    def __init__(self, cfg: ModelConfig):
        min_size = cfg.min_size if isinstance(cfg.min_size, tuple) else (cfg.min_size,)
        super().__init__(min_size, cfg.max_size, list(cfg.image_mean), list(cfg.image_std))
        self.test_size, self.test_max_size = cfg.test_size, cfg.test_max_size

    def resize(self, image, target=None):
        if self.training or not self.test_size:
            return super().resize(image, target)
        train_sizes = self.min_size, self.max_size
        self.min_size, self.max_size = (self.test_size,), self.test_max_size or self.max_size
        try:
            return super().resize(image, target)
        finally:
            self.min_size, self.max_size = train_sizes


def set_test_size(model: FasterRCNN, size: int | None, max_size: int | None = None) -> None:
    """Set the input short side (and long-side cap) used at inference, in the model and its config."""
    model.transform.test_size, model.transform.test_max_size = size, max_size
    model.digit_config.test_size, model.digit_config.test_max_size = size, max_size


def at_input_size(model: FasterRCNN, size: int, max_size: int | None = None) -> FasterRCNN:
    """A view of ``model`` that infers at another short side (and long-side cap), sharing its weights;
    ``model`` itself is untouched, so views are safe to use while others use the model."""
    view = copy.copy(model)
    view._modules = dict(model._modules)  # its own submodule table: replacing the transform stays local
    view.transform = copy.copy(model.transform)
    view.transform.test_size, view.transform.test_max_size = size, max_size
    return view


# Multi-scale reading: the model at its own input size and at this factor larger. On `valid` with the
# digit reader, resnet18_fpn read 0.777 at 120 px alone and 0.787-0.797 paired with 128-144 px.
MULTI_SCALE_FACTOR = 1.15


def multi_scale_views(model: FasterRCNN, factor: float = MULTI_SCALE_FACTOR) -> list[FasterRCNN]:
    """``model`` at its inference size and at ``factor`` times it (rounded to 8 px), long side alike."""
    cfg: ModelConfig = model.digit_config
    larger = 8 * round((cfg.test_size or cfg.train_size) * factor / 8)
    return [model, at_input_size(model, larger, cfg.max_size_for(larger))]


def build_model(cfg: ModelConfig | str) -> FasterRCNN:
    """Build a randomly initialised detector (never downloads anything)."""
    if isinstance(cfg, str):
        cfg = default_config(cfg)
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    model = ARCHITECTURES[cfg.architecture][0](cfg)
    stock = model.rpn.anchor_generator
    model.rpn.anchor_generator = _anchor_generator(cfg, len(stock.sizes), stock.num_anchors_per_location()[0])
    model.roi_heads.box_roi_pool = use_fast_roi_align(model.roi_heads.box_roi_pool)
    model.transform = DigitTransform(cfg)
    model.digit_config = cfg
    return model


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` into the ``Conv2d`` registered just before it, in place
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``): the same outputs to float rounding, one op less per
    layer (3-4% of the default pipeline's time). For inference only: the norms no longer exist to
    train. A norm registered right after a conv must follow it in ``forward``, as in torchvision's
    ResNets, MobileNetV3 and FPN and in this package's readers (tests compare the outputs)."""
    names = list(module._modules)
    for a, b in zip(names, names[1:]):
        conv, norm = module._modules[a], module._modules[b]
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and not (conv.training or norm.training):
            module._modules[a], module._modules[b] = fuse_conv_bn_eval(conv, norm), nn.Identity()
    for child in module.children():
        fold_batch_norms(child)
    return module


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools in channels-last memory and returns the layout it was given: the
    same values, faster on CPU, where torch 2.14's NCHW max-pool kernel is 4-10x slower than its
    channels-last one (ResNet's stem pool at the default input size: 4.3 ms, against 1.0 ms for the
    two copies and the channels-last pool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous(memory_format=layout)


def fast_pools(module: nn.Module) -> nn.Module:
    """Swap every ``nn.MaxPool2d`` in ``module`` for a :class:`ChannelsLastMaxPool2d` of the same
    settings, or for ``nn.Identity`` where it pools 1 x 1 with stride 1 (a no-op), in place."""
    for name, child in module.named_children():
        if type(child) is nn.MaxPool2d and not child.return_indices:
            kernel, stride = _pair(child.kernel_size), _pair(child.stride or child.kernel_size)
            if kernel == stride == (1, 1) and _pair(child.padding) == (0, 0):
                module._modules[name] = nn.Identity()
            else:
                module._modules[name] = ChannelsLastMaxPool2d(child.kernel_size, child.stride, child.padding,
                                                              child.dilation, ceil_mode=child.ceil_mode)
        else:
            fast_pools(child)
    return module


# Inference precision. On CPUs with Intel AMX (Sapphire Rapids and later), oneDNN multiplies bfloat16
# matrices in hardware: a 64-channel 3 x 3 conv at the default input size took 0.44 ms against 1.28 in
# float32. Elsewhere bfloat16 is no faster (or slower), so "auto" keeps float32 there.
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "DIGIT_DEMO_PRECISION"
# the parts of a detector worth running in bfloat16 (the readers name theirs in ``bfloat16_parts``)
DETECTOR_BFLOAT16_PARTS = ("backbone", "rpn.head", "roi_heads.box_head")


def has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles (hardware bfloat16 matrix multiplies)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def inference_precision(precision: str | None = None) -> str:
    """"fp32" or "bf16": ``precision``, else ``$DIGIT_DEMO_PRECISION``, else "auto", which is bf16
    where the CPU has AMX (:func:`has_amx`) and fp32 elsewhere."""
    chosen = precision or os.environ.get(PRECISION_ENV) or "auto"
    if chosen not in PRECISIONS:
        raise ValueError(f"unknown precision {chosen!r}; choose one of {', '.join(PRECISIONS)}")
    return ("bf16" if has_amx() else "fp32") if chosen == "auto" else chosen


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``obj`` (or nested in its lists, tuples and dicts) cast to ``dtype``: 4-D
    ones channels-last in bfloat16, in the usual layout otherwise."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point():
            return obj
        layout = torch.channels_last if dtype == torch.bfloat16 and obj.dim() == 4 else torch.contiguous_format
        return obj.to(dtype).contiguous(memory_format=layout)
    if isinstance(obj, dict):
        return type(obj)((k, _cast(v, dtype)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


class Bfloat16(nn.Module):
    """Runs ``module`` with bfloat16 weights and channels-last bfloat16 activations; takes and returns
    float32 (tensors, or lists, tuples and dicts of them)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.to(torch.bfloat16).to(memory_format=torch.channels_last)

    def forward(self, *args: Any) -> Any:
        return _cast(self.module(*_cast(args, torch.bfloat16)), torch.float32)


def in_bfloat16(module: nn.Module) -> nn.Module:
    """Wrap the heavy parts of ``module`` and its submodules in :class:`Bfloat16`, in place: a
    detector's backbone, RPN head and box head (``DETECTOR_BFLOAT16_PARTS``), the parts a reader names
    in ``bfloat16_parts``. The rest (box regression and classification layers, the GRU, RoI
    pooling, post-processing) stays float32."""
    targets = [(m, DETECTOR_BFLOAT16_PARTS if isinstance(m, FasterRCNN) else getattr(m, "bfloat16_parts", ()))
               for m in module.modules()]
    for owner, parts in targets:
        for name in parts:
            if not isinstance(part := owner.get_submodule(name), Bfloat16):  # wrapped once only
                owner.set_submodule(name, Bfloat16(part))
    return module


def for_inference(module: nn.Module, precision: str | None = None) -> nn.Module:
    """``module`` ready for inference, in place: batch norms folded (:func:`fold_batch_norms`), max
    pools made faster (:func:`fast_pools`), and in bfloat16 where :func:`inference_precision` says so
    (:func:`in_bfloat16`). In float32 the outputs equal the plain module's to float rounding; in
    bfloat16 they are close (the default on `valid`: the same accuracy, mAP 0.403 against 0.406)."""
    module = fast_pools(fold_batch_norms(module))
    return in_bfloat16(module) if inference_precision(precision) == "bf16" else module
