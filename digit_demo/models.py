"""Model registry: Faster R-CNN digit detectors built by name, offline, from scratch.

Every model has 11 classes (0 = background, ``k + 1`` = digit ``k``), is built with
``weights=None, weights_backbone=None`` (no download ever), a small input size suited to SVHN
photos, anchors shaped like digits (taller than wide), heads sized for a handful of objects, and the
vectorised CPU RoIAlign of :mod:`digit_demo.roi_align`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn
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
