import math

import pytest
import torch

from kennel.core.device import resolve_amp, resolve_device
from kennel.data.dataset import ImageArrayDataset
from kennel.train.batches import make_loader
from kennel.train.fine_tune import train
from kennel.train.loop import evaluate
from kennel.train.optim import build_optimizer
from tests.conftest import make_params


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_resolve_device_auto_prefers_cuda_then_mps(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not cuda:
        with pytest.raises(RuntimeError, match="train.device = 'cuda'"):
            resolve_device("cuda")


@pytest.mark.parametrize("flags,expected", [({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                            ({"amx_bf16"}, torch.bfloat16), ({"avx2", "avx512f"}, None)])
def test_resolve_amp_on_a_cpu_follows_its_bf16_flags(monkeypatch, flags, expected):
    from kennel.core import device

    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is expected
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16


OPTIMIZERS = [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]


@pytest.mark.parametrize("name,cls", OPTIMIZERS)
def test_build_optimizer(name, cls):
    layer = torch.nn.Linear(2, 2)
    layer.bias.requires_grad = False
    opt = build_optimizer(name, layer.parameters(), lr=0.1, momentum=0.8, weight_decay=0.01)
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.01
    assert len(opt.param_groups[0]["params"]) == 1  # frozen parameters are left out
    with pytest.raises(ValueError, match="train.optimizer = 'lion'"):
        build_optimizer("lion", layer.parameters(), 0.1, 0.9, 0.0)


def test_train_learns_and_reports_every_epoch(resized):
    seen = []
    result = train(make_params(**{"train.epochs": 3, "train.amp": "off"}), resized, on_epoch=seen.append)
    assert [r.epoch for r in result.history] == [1, 2, 3] == [r.epoch for r in seen]
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(r.images_per_second > 0 and 0 <= r.val_accuracy <= 1 for r in result.history)
    assert result.device.type == "cpu" and result.weights.source == "none"


def test_same_seed_same_weights(resized):
    params = make_params(**{"train.amp": "off"})
    a, b = train(params, resized).model, train(params, resized).model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    c = train(make_params(**{"train.amp": "off", "seed": 7}), resized).model
    assert not torch.equal(a.backbone.fc.weight, c.backbone.fc.weight)


def test_head_mode_only_changes_the_head(resized):
    result = train(make_params(**{"model.finetune": "head", "train.amp": "off"}), resized)
    fresh = train(make_params(**{"model.finetune": "head", "train.epochs": 1, "train.lr": 1e-12}), resized).model
    assert torch.equal(result.model.backbone.conv1.weight, fresh.backbone.conv1.weight)
    assert not torch.equal(result.model.backbone.fc.weight, fresh.backbone.fc.weight)


def test_evaluate_on_empty_split_is_nan(resized, tmp_path):
    result = train(make_params(**{"train.epochs": 1}), resized)
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0).long())
    loss, acc = evaluate(result.model, torch.utils.data.DataLoader(empty), torch.device("cpu"))
    assert math.isnan(loss) and math.isnan(acc)
    ds = ImageArrayDataset(resized, "test")
    loss, acc = evaluate(result.model, make_loader(ds, batch_size=4, num_workers=0, device=torch.device("cpu")),
                         torch.device("cpu"))
    with torch.inference_mode():  # the same numbers, computed by hand
        logits = result.model.eval()(torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))]))
    labels = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits.float(), labels).item(), rel=1e-4)
    assert acc == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_a_lone_last_sample_does_not_break_batchnorm(resized):
    n = len(ImageArrayDataset(resized, "train"))
    result = train(make_params(**{"train.batch_size": n - 1, "train.epochs": 1}), resized)  # batches of n-1 and 1
    assert result.history[0].train_loss > 0
