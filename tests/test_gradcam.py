import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kennel.evaluate.gradcam import grad_cam, target_layer
from kennel.model.network import Classifier, build_model

S = 32


def left_half_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise everywhere; the class is drawn only in the left half: vertical stripes (0) or horizontal (1)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 128, (n, 3, S, S)).astype(np.uint8)
    y = rng.integers(0, 2, n)
    for i in range(n):
        period = int(rng.integers(3, 6))
        off = int(rng.integers(0, period))
        if y[i] == 0:
            x[i, :, :, off:S // 2:period] = 255
        else:
            x[i, :, off::period, :S // 2] = 255
    return torch.from_numpy(x), torch.from_numpy(y)


def small_cnn() -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))


def test_grad_cam_looks_where_the_class_is_drawn():
    torch.manual_seed(0)
    train_x, train_y = left_half_images(256, seed=0)
    test_x, test_y = left_half_images(32, seed=1)
    model = Classifier(small_cnn(), ["vertical", "horizontal"], head="13")
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        model.train()
        for i in range(0, len(train_x), 32):
            loss = F.cross_entropy(model(train_x[i:i + 32]), train_y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        predicted = model(test_x).argmax(1)
    assert (predicted == test_y).float().mean() > 0.9  # the model did learn the stripes
    cam = grad_cam(model, test_x, predicted)
    assert cam.shape == (32, S, S) and cam.min() >= 0 and cam.max() == pytest.approx(1)
    left = cam[:, :, :S // 2].sum(axis=(1, 2)) / cam.sum(axis=(1, 2))
    assert left.mean() > 0.75 and left.min() > 0.6
    # With flip TTA the map still explains the image as it is, not its mirror: the plain model's map (the gradient
    # through the averaged views, computed here by hand, gives the same one)
    model.tta = "flip"
    layer = target_layer(model, test_x[:1])[1]
    captured = []
    handle = layer.register_forward_hook(lambda m, i, out: captured.append(out))
    score = model(test_x.float().requires_grad_(True)).gather(1, predicted[:, None]).sum()
    handle.remove()
    grad = torch.autograd.grad(score, captured[0])[0]
    by_hand = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * captured[0].detach()).sum(1, keepdim=True))
    by_hand = F.interpolate(by_hand, size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    by_hand = (by_hand / by_hand.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)).numpy()
    assert np.allclose(grad_cam(model, test_x, predicted), by_hand, atol=1e-4)
    assert np.allclose(by_hand, cam, atol=1e-4)
    model.tta = "dihedral"
    assert np.allclose(grad_cam(model, test_x, predicted), cam, atol=1e-4) and model.tta == "dihedral"


@pytest.mark.parametrize("arch, layer", [
    ("resnet18", "backbone.layer4"), ("mobilenet_v3_small", "backbone.features"),
    ("efficientnet_b0", "backbone.features"), ("convnext_tiny", "backbone.features"),
    ("regnet_y_400mf", "backbone.trunk_output"),
])
def test_grad_cam_finds_the_last_feature_map_of_every_family(arch, layer):
    torch.manual_seed(0)
    model, _ = build_model(arch, ["a", "b", "c"], weights="none")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    name, module = target_layer(model, x[:1])
    assert name == layer
    cam = grad_cam(model, x, torch.tensor([0, 2]), layer=module)
    assert cam.shape == (2, 64, 64) and np.isfinite(cam).all() and 0 <= cam.min() and cam.max() <= 1
    assert not any(p.grad is not None for p in model.parameters())  # the model is left as it was


def test_grad_cam_works_on_a_frozen_backbone():
    torch.manual_seed(0)
    model, _ = build_model("resnet18", ["a", "b"])
    model.set_frozen(True)
    cam = grad_cam(model, torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8), torch.tensor([1]))
    assert cam.shape == (1, 64, 64) and cam.max() == pytest.approx(1)


def test_a_model_without_a_feature_map_is_named():
    with pytest.raises(ValueError, match="Sequential: no convolutional feature map"):
        target_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.zeros(1, 3, 2, 2))
