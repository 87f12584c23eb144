"""The classifier: a torchvision backbone with its head replaced for the dataset's classes, normalisation and
test-time augmentation inside, built from an arch name and weights."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models

from kennel.core.archs import head_path, supported_archs
from kennel.model.weights import WeightsInfo, read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """uint8 (or 0..255 float) images N x 3 x S x S -> logits; normalisation lives in the model.

    Keeping the ImageNet normalisation inside the module means training, evaluation, ``kennel predict`` and
    the MLflow model all take the same raw pixels, and the division runs on the device. With ``tta = "flip"``
    the eval-mode output is the mean of the logits of each image and its mirror. An ensemble (``members``: further
    copies of the backbone with their own weights, ``train.ensemble``) outputs the mean of every member's logits.
    """

    def __init__(self, backbone: nn.Module, classes: Sequence[str], head: str, frozen: bool = False,
                 tta: str = "none"):
        super().__init__()
        self.backbone = backbone
        self.classes = list(classes)
        self.head_name = head
        self.tta = tta
        self.freeze_bn = False  # training keeps the backbone's BatchNorm statistics (set for a run, not saved)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.set_frozen(frozen)

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_submodule(self.head_name)

    def head_parameter_names(self) -> set[str]:
        return {f"backbone.{self.head_name}.{n}" for n, _ in self.head.named_parameters()}

    def set_frozen(self, frozen: bool) -> None:
        """Frozen: only the head learns, and the backbone's BatchNorm statistics stay as they are."""
        self.frozen = frozen
        head = self.head_parameter_names()
        for name, p in self.named_parameters():
            p.requires_grad = not frozen or name in head
        self.train(self.training)

    @property
    def members(self) -> Sequence[nn.Module]:
        """An ensemble's further models (state keys ``members.<i>.*``), none for a single model."""
        return self._modules.get("members") or ()

    def add_members(self, count: int) -> None:
        """``count`` further models of an ensemble, copies of the backbone until their weights are loaded
        (``load_state_dict`` with ``members.<i>.*`` keys, as ``ensemble_state`` makes). Registered only then: a
        single model's file stays byte for byte what it was."""
        if count and "members" not in self._modules:
            self._modules["members"] = nn.ModuleList()  # add_module refuses a name the property holds
        for _ in range(count):
            self._modules["members"].append(copy.deepcopy(self.backbone))

    @contextmanager
    def without_head(self) -> Iterator[Classifier]:
        """The model outputting the head's input (the backbone features), for as long as the block runs."""
        if len(self.members):
            raise ValueError("an ensemble's members each have their own features: no one feature space")
        parent_name, _, leaf = self.head_name.rpartition(".")
        parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
        head = self.head
        setattr(parent, leaf, nn.Identity())
        try:
            yield self
        finally:
            setattr(parent, leaf, head)

    @contextmanager
    def one_view(self) -> Iterator[Classifier]:
        """The model without test-time augmentation (each image as it is), for as long as the block runs."""
        tta, self.tta = self.tta, "none"
        try:
            yield self
        finally:
            self.tta = tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        nets = [self.backbone, *self.members]
        if self.tta != "none" and not self.training:
            # a pass per view rather than one over a stacked batch: torch.export keeps the batch size dynamic
            views = tta_views(x, self.tta)
            return sum(net(view) for net in nets for view in views) / (len(views) * len(nets))
        if len(nets) > 1:
            return sum(net(x) for net in nets) / len(nets)
        return self.backbone(x)

    def from_features(self, features: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
        """What ``forward`` outputs given the backbone's features (``without_head``) of the images and of their
        mirrors: the head's logits, their mean over both with ``tta`` flip in eval mode (``dihedral`` needs the
        turned images' features: a pass through ``forward``)."""
        if self.tta == "dihedral" and not self.training:
            raise ValueError("tta dihedral averages over turned images: run the images through the model")
        if self.tta == "flip" and not self.training:
            return (self.head(features) + self.head(mirrored)) / 2
        return self.head(features)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if getattr(self, "frozen", False):
            self.backbone.eval()
            self.head.train(mode)
        elif mode and getattr(self, "freeze_bn", False):
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()  # normalise with the pretrained statistics; the affine weights still learn
        return self


def ensemble_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One Classifier state of several with the same structure (``backbone.*`` keys): the first as the backbone,
    each further one as a member (``members.<i>.*``): what a model with ``add_members(len(states) - 1)`` loads."""
    first, *rest = states
    return {**first, **{f"members.{i}.{k.removeprefix('backbone.')}": v
                        for i, state in enumerate(rest) for k, v in state.items()}}


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of square images N x C x S x S that ``tta`` averages over: flip, each image and its mirror;
    dihedral, the four quarter turns of each and of its mirror (images with no "up": tiles seen from above, slides).
    Turns as a transpose and a flip: the operators ONNX has (its exporter has no rot90)."""
    if tta == "flip":
        return [x, x.flip(-1)]
    if tta == "dihedral":
        turned = x.transpose(-2, -1)
        turns = [x, turned.flip(-2), x.flip(-2).flip(-1), turned.flip(-1)]  # 0, 1, 2, 3 quarter turns
        return [view for turn in turns for view in (turn, turn.flip(-1))]
    raise ValueError(f"tta {tta!r}: allowed: flip | dihedral")


def build_model(arch: str, classes: Sequence[str], weights: str = "none") -> tuple[Classifier, WeightsInfo]:
    """``arch`` with its head replaced by ``Linear(in_features, len(classes))``, weights loaded per ``weights``;
    every layer trainable (what a run freezes, and when, is its recipe's: ``kennel.train.recipe``)."""
    head = head_path(arch)
    if not head or arch not in list_models(module=torchvision.models):
        raise ValueError(f"model.arch = {arch!r}: allowed: {', '.join(supported_archs())}")
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes, got {list(classes)}")
    backbone = get_model(arch, weights=None, num_classes=len(classes))
    state, info = read_weights(arch, weights, len(classes))
    if state is not None:
        backbone.load_state_dict(state, strict=False)  # read_weights checked that only the head is missing
    return Classifier(backbone, classes, head), info
