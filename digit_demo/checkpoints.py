"""Checkpoints: fp16 safetensors weights + a JSON sidecar that says how to rebuild and trust them."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .models import ARCHITECTURES, ModelConfig, build_model

CHECKPOINTS_ENV = "DIGIT_DEMO_CHECKPOINTS"  # another checkpoint folder (e.g. a reproduction's release) in place of checkpoints/
CHECKPOINT_DIR = Path(os.environ.get(CHECKPOINTS_ENV) or Path(__file__).resolve().parent.parent / "checkpoints")
HUB_REPO_ENV = "DIGIT_DEMO_HUB_REPO"  # e.g. "user/digit-demo-checkpoints"; only used when online
DEFAULT_MODEL = "resnet18_fpn"
CLASSES = {str(k + 1): str(k) for k in range(10)}  # category_id -> digit; 0 is background
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not match what it claims to be."""


Settings = TypeVar("Settings")
NOTES = ("chosen_on",)  # what a sidecar's ``tuned`` block may say beside the settings


def tuned(meta: dict, kind: type[Settings], **given) -> Settings:
    """The frozen settings ``kind`` (a dataclass of numbers and tuples of numbers) read once from the
    sidecar's ``tuned`` block, ``given`` (values kept elsewhere in the sidecar) overriding it; absent
    fields keep their defaults. A field whose default is a whole number stays one; null is taken where
    the field's type allows None. A key that is no field of ``kind`` (nor a note), or a value of the
    wrong type, is a :class:`CheckpointError` naming the sidecar and the key."""
    block = dict(meta.get("tuned") or {}, **given)
    fields = {f.name: f for f in dataclasses.fields(kind)}
    values = {}
    where = f"{meta.get('name', '?')}.json: tuned"
    for key, value in block.items():
        if key in NOTES:
            continue
        if key not in fields:
            raise CheckpointError(f"{where} has {key!r}, which a {kind.__name__} does not have ({', '.join(fields)})")
        default = fields[key].default
        if value is None and "None" in str(fields[key].type):
            values[key] = None
            continue
        try:
            if isinstance(default, tuple):
                values[key] = tuple(float(v) for v in value)
            elif isinstance(default, int) and not isinstance(default, bool):
                if float(value) != int(value):
                    raise ValueError
                values[key] = int(value)
            else:
                values[key] = float(value)
        except (TypeError, ValueError):
            kind_of = "whole number" if isinstance(default, int) and not isinstance(default, tuple) else "number"
            raise CheckpointError(f"{where}[{key!r}] = {value!r} is not a {kind_of}{'s' * isinstance(default, tuple)}") from None
        if isinstance(default, tuple) and len(values[key]) != len(default):
            raise CheckpointError(f"{where}[{key!r}] = {value!r} does not hold {len(default)} numbers")
    return kind(**values)


def measured(meta: dict, key: str | None = None) -> dict:
    """What the sidecar's ``metrics`` record under ``key`` (e.g. "valid", "valid_multi_scale",
    "tune_scenes"), or all of them; empty where nothing was measured."""
    metrics = meta.get("metrics") or {}
    return metrics if key is None else metrics.get(key) or {}


def write_weights(model: nn.Module, path: str | Path, architecture: str, fields: dict, meta: dict,
                  dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model``'s weights as ``path`` (.safetensors, cast to ``dtype``) and its ``.json``
    sidecar: format version, name, architecture, the model's ``fields``, the weights' dtype, ``meta``."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path), metadata={"architecture": architecture})
    sidecar = {"format_version": FORMAT_VERSION, "name": path.stem, "architecture": architecture, **fields,
               "weights_dtype": str(dtype).replace("torch.", ""), **meta}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a resolved safetensors checkpoint; :class:`CheckpointError` when it is not one."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path.name}: not a valid safetensors file ({e})") from None


def save_checkpoint(model: nn.Module, path: str | Path, meta: dict, dtype: torch.dtype = torch.float16) -> Path:
    """Write a detector as ``path`` (.safetensors, weights cast to ``dtype``) and its ``.json`` sidecar."""
    cfg: ModelConfig = model.digit_config
    fields = {
        "config": cfg.to_dict(),
        "input_size": {"min_size": cfg.min_size, "max_size": cfg.max_size,
                       "test_size": cfg.test_size, "test_max_size": cfg.test_max_size},
        "normalisation": {"mean": list(cfg.image_mean), "std": list(cfg.image_std)},
        "classes": CLASSES,
    }
    return write_weights(model, path, cfg.architecture, fields, meta, dtype)


def _hub_download(name: str) -> Path | None:
    repo = os.environ.get(HUB_REPO_ENV)
    if not repo or os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    from huggingface_hub import hf_hub_download  # imported lazily: offline use never needs it

    try:
        weights = hf_hub_download(repo, f"{name}.safetensors")
        hf_hub_download(repo, f"{name}.json")
    except Exception as e:  # network, auth, missing file: all end in one clear message
        raise CheckpointError(f"{name}: not found locally and download from {repo} failed ({e})") from None
    return Path(weights)


def resolve(name_or_path: str | Path) -> Path:
    """Find a checkpoint: a path, then ``checkpoints/<name>``, then the Hub repo in $DIGIT_DEMO_HUB_REPO."""
    p = Path(name_or_path)
    for candidate in (p, p.with_suffix(".safetensors"), CHECKPOINT_DIR / p.name, (CHECKPOINT_DIR / p.name).with_suffix(".safetensors")):
        if candidate.is_file() and candidate.suffix in (".safetensors", ".json"):
            return candidate.with_suffix(".safetensors")
    downloaded = _hub_download(p.stem)
    if downloaded:
        return downloaded
    hint = f" (set {HUB_REPO_ENV} and go online to download from the Hugging Face Hub)" if not os.environ.get(HUB_REPO_ENV) else ""
    raise CheckpointError(f"checkpoint {str(name_or_path)!r} not found; available: {', '.join(available()) or 'none'}{hint}")


def load_module(name_or_path: str | Path, architecture: str, build: Callable[[dict], nn.Module], what: str) -> nn.Module:
    """Load a non-detector checkpoint of ``architecture`` (fp32, eval mode, its sidecar as ``.meta``),
    built from its sidecar by ``build``; :class:`CheckpointError` when it is not ``what``."""
    path = resolve(name_or_path)
    meta = read_sidecar(path)
    if meta["architecture"] != architecture:
        raise CheckpointError(f"{path.name}: a {meta['architecture']!r} checkpoint, not a {what}")
    model = build(meta)
    state = read_weights(path)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as e:
        raise CheckpointError(f"{path.name}: weights do not fit the {what} ({str(e).splitlines()[0]})") from None
    model.meta = meta
    return model.eval()


def resolve_optional(name: str | Path | None, default: str) -> Path | None:
    """A second-stage checkpoint to load: none for ``None`` or where ``default`` is asked for but not
    shipped; any other name must resolve."""
    if name is None:
        return None
    try:
        return resolve(name)
    except CheckpointError:
        if str(name) == default:
            return None
        raise


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of a resolved checkpoint path."""
    side = Path(path).with_suffix(".json")
    if not side.is_file():
        raise CheckpointError(f"{path}: missing sidecar {side.name} (architecture and settings are unknown)")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{side}: sidecar is not valid JSON ({e})") from None
    for key in ("architecture", "config"):
        if key not in meta:
            raise CheckpointError(f"{side}: sidecar has no {key!r}")
    return meta


def load_checkpoint(name_or_path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model from its sidecar and load its weights (as fp32, eval mode).

    Raises :class:`CheckpointError` naming the problem when weights and architecture disagree.
    """
    path = resolve(name_or_path)
    meta = read_sidecar(path)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
        model = build_model(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: sidecar describes a model that cannot be built ({e})") from None
    state = read_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
        raise CheckpointError(
            f"{path.name}: weights do not fit architecture {cfg.architecture!r}: " + "; ".join(parts)
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    model.eval()
    meta["path"] = str(path)
    return model, meta


def available(directory: Path = CHECKPOINT_DIR) -> list[str]:
    """Names of the detector checkpoints in ``directory`` (those whose sidecar names a registered
    detector architecture; the digit reader is not one)."""
    names = []
    for p in sorted(directory.glob("*.safetensors")):
        try:
            if json.loads(p.with_suffix(".json").read_text()).get("architecture") in ARCHITECTURES:
                names.append(p.stem)
        except (OSError, ValueError):
            continue
    return names
