import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from kennel.core.errors import WeightsError
from kennel.model.file import load_model, save_model
from kennel.model.network import build_model
from kennel.model.weights import imagenet_cache_path


def test_head_is_swapped_for_the_class_count():
    model, info = build_model("resnet18", ["a", "b", "c"], weights="none")
    assert isinstance(model.backbone.fc, nn.Linear)
    assert (model.backbone.fc.in_features, model.backbone.fc.out_features) == (512, 3)
    assert info.source == "none" and model.classes == ["a", "b", "c"]
    out = model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert out.shape == (2, 3) and out.dtype == torch.float32


def test_uint8_input_is_normalised_inside_the_model():
    model, _ = build_model("resnet18", ["a", "b"], weights="none")
    model.eval()
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model(x), model(x.float()))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.backbone((x.float() / 255 - mean) / std), rtol=1e-4, atol=1e-4)


def test_a_frozen_model_trains_only_fc():
    model, _ = build_model("resnet18", ["a", "b"], weights="none")
    model.set_frozen(True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone.fc.weight", "backbone.fc.bias"}
    model.train()
    assert not model.backbone.bn1.training and model.backbone.fc.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert torch.equal(before, model.backbone.bn1.running_mean)  # frozen BN statistics


def test_a_built_model_trains_everything():
    model, _ = build_model("resnet18", ["a", "b"], weights="none")
    assert all(p.requires_grad for p in model.parameters())


def test_imagenet_weights_load_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = resnet18()
    cache = imagenet_cache_path()
    assert cache == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cache)
    for mode in ("imagenet", "auto"):
        model, info = build_model("resnet18", ["a", "b"], weights=mode)
        assert info.source == "imagenet" and not info.warning
        assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
        assert model.backbone.fc.out_features == 2


def test_imagenet_offline_without_cache_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        build_model("resnet18", ["a", "b"], weights="imagenet")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(err.value)
    assert "download.pytorch.org" in str(err.value)


def test_auto_falls_back_to_random_init_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, info = build_model("resnet18", ["a", "b"], weights="auto")
    assert info.source == "random-fallback"
    assert "random init" in info.warning and "resnet18-f37072fd.pth" in info.warning


def test_weights_from_a_file_path(tmp_path):
    reference = resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")  # 1000-class fc: skipped, new head kept
    model, info = build_model("resnet18", ["a", "b"], weights=str(tmp_path / "r18.pth"))
    assert info.source.startswith("file:")
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.backbone.fc.out_features == 2


def test_bad_weight_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="nope.pt.*file not found"):
        build_model("resnet18", ["a", "b"], weights=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt: not a loadable state dict"):
        build_model("resnet18", ["a", "b"], weights=str(tmp_path / "junk.pt"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="other.pt: not a resnet18 state dict"):
        build_model("resnet18", ["a", "b"], weights=str(tmp_path / "other.pt"))


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="evil.pt: not a loadable state dict"):
        build_model("resnet18", ["a", "b"], weights=str(tmp_path / "evil.pt"))


def test_saved_model_roundtrip(tmp_path):
    model, _ = build_model("resnet18", ["cat", "dog"], weights="none")
    model.eval()
    save_model(model, tmp_path / "m.pt", size=32, arch="resnet18", mode="center_crop")
    loaded, size = load_model(tmp_path / "m.pt")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert size == 32 and loaded.classes == ["cat", "dog"]
    assert torch.equal(loaded(x), model(x))
    # kennel's own model file is also accepted as model.weights (warm start)
    warm, _ = build_model("resnet18", ["cat", "dog"], weights=str(tmp_path / "m.pt"))
    assert torch.equal(warm.backbone.fc.weight, model.backbone.fc.weight)


def test_unknown_arch_and_single_class_are_rejected():
    with pytest.raises(ValueError, match="model.arch = 'vgg'"):
        build_model("vgg", ["a", "b"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_model("resnet18", ["a"])
