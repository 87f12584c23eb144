"""The architectures kennel supports and where each keeps its head; no torch import, so params checks stay fast."""

from __future__ import annotations

# Where each supported family keeps its last Linear layer (the head a new class count replaces). Longest
# prefix first: "mobilenet_v3" before a shorter one it starts with.
HEADS = {
    "mobilenet_v2": "classifier.1",
    "mobilenet_v3": "classifier.3",
    "efficientnet": "classifier.1",
    "convnext": "classifier.2",
    "wide_resnet": "fc",
    "resnext": "fc",
    "resnet": "fc",
    "regnet": "fc",
}

# torchvision's classification models in those families, written out so that checking params imports no torch
# (prepare and resize never need it); a test keeps the list equal to torchvision's registry.
ARCHS = (
    "convnext_base", "convnext_large", "convnext_small", "convnext_tiny",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5",
    "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf",
    "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf",
    "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "wide_resnet101_2", "wide_resnet50_2",
)


def supported_archs() -> list[str]:
    return sorted(ARCHS)


def head_path(arch: str) -> str:
    """The attribute path of ``arch``'s last Linear layer; "" for an arch outside the supported families."""
    return next((path for family, path in HEADS.items() if arch.startswith(family)), "")
