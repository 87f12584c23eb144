"""Grad-CAM (Selvaraju et al., 2017): where in an image the model found the evidence for a class.

The heatmap is the ReLU of the last convolutional feature map weighted by the spatially averaged gradient of the
class logit. The layer is found from the model's structure, so every torchvision family works without a table.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kennel.model.network import Classifier

POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def target_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module]:
    """(name, module) whose output is the last 4-D feature map before global pooling.

    Among a module's children, in the order they run on ``example``, it is the last one whose output is
    N x C x H x W and that is not a pooling layer (ResNet's ``layer4``, RegNet's ``trunk_output``, the
    ``features`` of MobileNet, EfficientNet and ConvNeXt). Where no child qualifies (a wrapper such as kennel's
    Classifier), the search goes on inside the child that ran last. Children are compared, not all modules, so
    that a 4-D layer after the pooling (ConvNeXt's LayerNorm2d on the 1x1 map) is not taken for the features.
    Runs ``example`` through the model once, in eval mode (the model is left in eval mode).
    """
    ran: list[tuple[str, nn.Module, int]] = []  # completion order: a child finishes before its parent
    handles = [
        module.register_forward_hook(lambda m, i, out, name=name: ran.append((name, m, getattr(out, "ndim", 0))))
        for name, module in model.named_modules() if name
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    parent = ""
    while True:
        children = [(n, m, d) for n, m, d in ran if n.rpartition(".")[0] == parent]
        if not children:
            raise ValueError(f"{type(model).__name__}: no convolutional feature map found for Grad-CAM")
        maps = [(n, m) for n, m, d in children if d == 4 and not isinstance(m, POOLS)]
        if maps:
            return maps[-1]
        parent = children[-1][0]


def grad_cam(
    model: nn.Module, images: torch.Tensor, class_index: torch.Tensor, layer: nn.Module | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Heatmaps N x H x W in [0, 1] (each scaled to its own maximum) of ``class_index[i]`` for ``images[i]``.

    ``images`` are what the model takes (uint8 N x 3 x H x W); they go to the model's device.
    """
    device = next(model.parameters()).device
    model.eval()
    # A TTA model's map of the image as it is: through the averaged views the gradient reaching the first view's
    # feature map is the plain model's over their number, so after scaling the map is the same, at one pass
    # instead of two or eight (eight views of a batch, with their graphs, take gigabytes).
    with model.one_view() if isinstance(model, Classifier) else contextlib.nullcontext():
        if layer is None:
            layer = target_layer(model, images[:1].to(device))[1]
        maps = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device).float()
            idx = torch.as_tensor(class_index[start:start + batch_size], device=device).long()
            maps.append(_cam(model, layer, x, idx))
    return torch.cat(maps).numpy() if maps else np.zeros((0, *images.shape[-2:]), np.float32)


def _cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = layer.register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        # The input asks for gradients so a frozen backbone (head fine-tuning) still has a graph to the layer.
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
            score = logits.float().gather(1, idx[:, None]).sum()
            (grad,) = torch.autograd.grad(score, captured[0])
    finally:
        handle.remove()
    act = captured[0].detach().float()
    cam = F.relu((grad.float().mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    top = cam.amax(dim=(1, 2), keepdim=True)
    return (cam / torch.where(top > 0, top, 1)).cpu()  # an all-zero map stays zero
