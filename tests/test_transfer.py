"""Transfer learning: every supported family, weights files good and bad, staged fine-tuning, test-time flips."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import get_model

from kennel.core.archs import head_path, supported_archs
from kennel.core.errors import ConfigError, WeightsError
from kennel.core.params import AUTO_ENSEMBLE_ALL_LAYERS, AUTO_EPOCHS, AUTO_EPOCHS_ALL_LAYERS, params_from_dict
from kennel.data.shards import read_meta, read_split
from kennel.evaluate.gradcam import grad_cam
from kennel.model.file import load_model, save_model
from kennel.model.network import build_model, ensemble_state
from kennel.model.weights import read_weights
from kennel.train.distributed import Dist
from kennel.train.fine_tune import TRAIN_VAL, PhaseData, find_resumable, seed_everything, setup_phase, train
from kennel.train.orientation import TURN_RATIO, TURN_SLACK
from kennel.train.recipe import AUTO_HEAD, BLENDS, Recipe
from tests.conftest import Killed, kill_at, small_params

# one of each family; the smallest where a family has several sizes
FAMILIES = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s",
            "convnext_tiny", "regnet_x_400mf"]
SMALL = "mobilenet_v3_small"  # for the weights files: a few MB


def _x(n=2, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resized(resized_with):
    return resized_with(per_class=12)


def test_the_written_out_arch_list_is_torchvisions_registry():
    registry = sorted(n for n in torchvision.models.list_models(module=torchvision.models) if head_path(n))
    assert supported_archs() == registry


def test_supported_archs_cover_every_family_and_others_are_refused():
    archs = supported_archs()
    for family in ("resnet50", "wide_resnet50_2", "resnext50_32x4d", "mobilenet_v3_large", "efficientnet_b7",
                   "efficientnet_v2_l", "convnext_large", "regnet_y_16gf", *FAMILIES):
        assert family in archs
    assert "vit_b_16" not in archs and "alexnet" not in archs
    with pytest.raises(ConfigError) as err:
        params_from_dict(small_params(**{"model.arch": "vgg11"}))
    assert "model.arch = 'vgg11'" in str(err.value) and "mobilenet_v2" in str(err.value)
    with pytest.raises(ValueError, match="model.arch = 'vgg11': allowed: .*convnext_tiny"):
        build_model("vgg11", ["a", "b"])


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_builds_trains_and_caches_features(arch):
    torch.manual_seed(0)
    reference = get_model(arch)
    model, _ = build_model(arch, ["a", "b", "c"], weights="none")
    model.set_frozen(True)
    # the head is the model's last Linear, replaced with one for 3 classes
    linears = [m for m in model.backbone.modules() if isinstance(m, nn.Linear)]
    assert model.head is linears[-1]
    assert model.head.in_features == reference.get_submodule(head_path(arch)).in_features
    assert model.head.out_features == 3
    assert {n for n, p in model.named_parameters() if p.requires_grad} == model.head_parameter_names()

    # head training: the frozen model's output is the head applied to the cached features
    x = _x()
    model.train()
    with torch.no_grad():
        out = model(x)
        with model.without_head():
            features = model.eval()(x)
        model.train()
        torch.testing.assert_close(model.head(features), out)

    # all layers train one step
    model.set_frozen(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert f"backbone.{head_path(arch)}.weight" in changed and len(changed) > 2


# ------------------------------------------------------------------------------------------------ weights files


@pytest.fixture(scope="module")
def imagenet_like():
    torch.manual_seed(1)
    return get_model(SMALL).state_dict()  # 1000-class head, as ImageNet checkpoints have


def _save(path, state):
    torch.save(state, path)
    return str(path)


def _body(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith(f"backbone.{head_path(SMALL)}.")}


def test_full_state_dict_with_another_head_loads_the_body(tmp_path, imagenet_like):
    model, info = build_model(SMALL, ["a", "b"], weights=_save(tmp_path / "full.pth", imagenet_like))
    for key, value in _body(model).items():
        assert torch.equal(value, imagenet_like[key.removeprefix("backbone.")]), key
    assert info.at_init == ["classifier.3.weight", "classifier.3.bias"]
    assert info.loaded == len(imagenet_like) - 2
    assert info.tags()["kennel.weights_at_init"] == "classifier.3.weight,classifier.3.bias"


def test_state_dict_with_the_same_head_loads_everything(tmp_path):
    source, _ = build_model(SMALL, ["a", "b"])
    model, info = build_model(SMALL, ["a", "b"], weights=_save(tmp_path / "same.pth", source.backbone.state_dict()))
    assert info.at_init == [] and torch.equal(model.head.weight, source.head.weight)


@pytest.mark.parametrize("prefix", ["", "module.", "backbone.", "model.", "encoder.", "module.backbone."])
def test_backbone_only_and_wrapped_state_dicts_load(tmp_path, imagenet_like, prefix):
    body = {prefix + k: v for k, v in imagenet_like.items() if not k.startswith("classifier.3.")}
    model, info = build_model(SMALL, ["a", "b"], weights=_save(tmp_path / "body.pth", body))
    assert info.source.startswith("file:") and info.at_init == ["classifier.3.weight", "classifier.3.bias"]
    for key, value in _body(model).items():
        assert torch.equal(value, imagenet_like[key.removeprefix("backbone.")]), key


def _missing(sd):
    return {k: v for k, v in sd.items() if k != "features.2.block.0.0.weight"}


def _unexpected(sd):
    return {**sd, "features.99.weight": torch.zeros(1)}


def _reshaped(sd):
    return {**sd, "features.0.0.weight": torch.zeros(1, 2, 3, 3)}


@pytest.mark.parametrize("spoil,words", [
    (_missing, "missing keys ['features.2.block.0.0.weight']"),
    (_unexpected, "unexpected keys ['features.99.weight']"),
    (_reshaped, "shape mismatch ['features.0.0.weight (1, 2, 3, 3) != (16, 3, 3, 3)']"),
    (lambda sd: {"fc.weight": torch.zeros(2, 512)}, "missing keys ['features.0.0.weight', "),
])
def test_state_dicts_that_do_not_fit_name_the_file_and_keys(tmp_path, imagenet_like, spoil, words):
    path = _save(tmp_path / "bad.pth", spoil(imagenet_like))
    with pytest.raises(WeightsError) as err:
        build_model(SMALL, ["a", "b"], weights=path)
    assert str(err.value).startswith(f"{path}: not a {SMALL} state dict") and words in str(err.value)


def test_truncated_corrupt_and_pickled_files_are_refused(tmp_path, imagenet_like):
    good = tmp_path / "good.pth"
    torch.save(imagenet_like, good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage" * 100)

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "pickled.pth").write_bytes(pickle.dumps({"features.0.0.weight": Payload()}))
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pth")
    for name in ("truncated", "corrupt", "pickled"):
        with pytest.raises(WeightsError, match=f"{name}.pth: not a loadable state dict"):
            read_weights(SMALL, str(tmp_path / f"{name}.pth"), 2)
    with pytest.raises(WeightsError, match="list.pth: holds a dict that is not a state dict of tensors"):
        read_weights(SMALL, str(tmp_path / "list.pth"), 2)


def test_imagenet_weights_of_any_arch_come_from_the_torch_cache(tmp_path, monkeypatch, imagenet_like):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        build_model(SMALL, ["a", "b"], weights="imagenet")
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert str(cached) in str(err.value)
    cached.parent.mkdir(parents=True)
    torch.save(imagenet_like, cached)
    model, info = build_model(SMALL, ["a", "b"], weights="imagenet")
    assert info.source == "imagenet" and torch.equal(model.backbone.features[0][0].weight,
                                                     imagenet_like["features.0.0.weight"])


# ------------------------------------------------------------------------------------------------ staged


def _staged(**overrides):
    return params_from_dict(small_params(**{"model.finetune": "staged", "train.epochs": 3, "train.head_epochs": 1,
                                            "train.backbone_lr_mult": 0.1, "train.select": "last",
                                            "train.amp": "off", **overrides}))


def test_staged_phase_one_freezes_the_backbone_and_phase_two_uses_two_rates(resized, tmp_path):
    params = _staged()
    phases = Recipe.from_params(params, pretrained=False).phases
    assert [(p.first, p.last, p.frozen) for p in phases] == [(1, 1, True), (2, 3, False)]
    seed_everything(params.seed)
    initial, _ = build_model("resnet18", ["cat", "dog"])  # the same init train() draws
    with pytest.raises(Killed):
        train(params, resized, on_epoch=kill_at(2), checkpoint=tmp_path / "ckpt.pt")
    after_phase_one = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert after_phase_one["phase"] == 1
    head = initial.head_parameter_names()
    for key, value in initial.state_dict().items():  # weights and BatchNorm statistics alike
        assert torch.equal(after_phase_one["model"][key], value) != (key in head), key

    with pytest.raises(Killed):
        train(params, resized, on_epoch=kill_at(3), checkpoint=tmp_path / "ckpt2.pt")
    in_phase_two = torch.load(tmp_path / "ckpt2.pt", weights_only=True)
    assert in_phase_two["phase"] == 2
    groups = in_phase_two["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([params.train.lr, params.train.lr * 0.1])
    assert len(groups[0]["params"]) == 2  # the head's weight and bias at the full rate
    moved = [k for k in initial.state_dict() if not torch.equal(in_phase_two["model"][k], initial.state_dict()[k])]
    assert "backbone.conv1.weight" in moved and "backbone.bn1.running_mean" in moved


@pytest.mark.parametrize("killed_after", [1, 2, 3], ids=["in-phase-1", "between-phases", "in-phase-2"])
def test_staged_run_resumes_exactly_in_either_phase(resized, tmp_path, killed_after):
    params = _staged(**{"train.epochs": 4, "train.head_epochs": 2, "train.select": "best", "train.amp": "auto"})
    straight = train(params, resized)
    with pytest.raises(Killed):
        train(params, resized, on_epoch=kill_at(killed_after + 1), checkpoint=tmp_path / "ckpt.pt")
    resume = find_resumable(tmp_path / "ckpt.pt", params, resized)
    assert resume["epoch"] == killed_after
    resumed = train(params, resized, checkpoint=tmp_path / "ckpt.pt", resume=resume)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.val_loss for r in straight.history] == [r.val_loss for r in resumed.history]
    assert straight.selected_epoch == resumed.selected_epoch


@pytest.fixture
def pretrained(tmp_path, imagenet_like):
    """Overrides for a staged run from a weights file (the blend needs pretrained weights)."""
    return {"model.arch": SMALL, "model.weights": str(_save(tmp_path / "pretrained.pth", imagenet_like))}


def test_blend_keeps_the_weighted_mean_of_the_kept_epoch_and_the_frozen_phase_end(resized, tmp_path, pretrained):
    """blend 1: the last all-layer epoch's weights; blend 0: the weights phase two started from (the end of the
    frozen phase, as its checkpoint holds them); 0.25: exactly 0.25 x the first + 0.75 x the second."""
    ends = {b: train(_staged(**pretrained, **{"train.blend": b}), resized) for b in (1.0, 0.0, 0.25)}
    with pytest.raises(Killed):
        train(_staged(**pretrained), resized, on_epoch=kill_at(2), checkpoint=tmp_path / "ckpt.pt")
    frozen_end = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    last, start, mixed = (ends[b].model.state_dict() for b in (1.0, 0.0, 0.25))
    for key, value in last.items():
        if value.is_floating_point():
            torch.testing.assert_close(start[key], frozen_end[key])
            torch.testing.assert_close(mixed[key], 0.25 * value + 0.75 * frozen_end[key])
    assert not torch.equal(last["backbone.features.0.0.weight"], start["backbone.features.0.0.weight"])
    assert ends[1.0].blended_val is None and "blended" not in ends[1.0].selected_reason
    loss, accuracy = ends[0.25].blended_val
    assert 0 <= accuracy <= 1 and loss > 0 and ends[0.25].kept_val_accuracy() == accuracy
    assert "then blended 0.25 x epoch 3 + 0.75 x the frozen phase's weights (train.blend): val loss" \
        in ends[0.25].selected_reason


def test_blend_leaves_a_kept_frozen_epoch_alone_and_survives_a_resume_in_phase_two(resized, tmp_path, pretrained):
    # a rate that wrecks the all-layer epoch: selection keeps the head's epoch, and there is nothing to blend
    head_kept = train(_staged(**pretrained, **{"train.epochs": 2, "train.select": "best", "train.lr": 50.0}), resized)
    assert head_kept.selected_epoch == 1 and head_kept.blended_val is None
    assert "blended" not in head_kept.selected_reason
    # from random init the frozen phase's backbone is noise: no blend
    assert train(_staged(**{"train.blend": 0.5}), resized).blended_val is None
    params = _staged(**pretrained, **{"train.epochs": 4, "train.blend": 0.5})
    straight = train(params, resized)
    with pytest.raises(Killed):
        train(params, resized, on_epoch=kill_at(4), checkpoint=tmp_path / "ckpt.pt")
    resumed = train(params, resized, checkpoint=tmp_path / "ckpt.pt",
                    resume=find_resumable(tmp_path / "ckpt.pt", params, resized))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert straight.blended_val is not None and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.blended_val == resumed.blended_val


def test_blend_auto_keeps_the_candidate_with_the_lowest_val_loss_and_equals_that_blend_set_by_hand(resized,
                                                                                                 pretrained):
    auto = train(_staged(**pretrained, **{"train.blend": "auto"}), resized)
    assert auto.blend in BLENDS and auto.selected_epoch == 3
    tried = dict(part.split(": ") for part in auto.decisions["blend"].split("(", 1)[1].split(";")[0].split(", "))
    assert [float(w) for w in tried] == list(BLENDS)
    assert float(tried[f"{auto.blend:g}"]) == pytest.approx(min(map(float, tried.values())), abs=1e-4)
    assert f"then blended {auto.blend:g} x epoch 3" in auto.selected_reason and "train.blend auto" in \
        auto.selected_reason
    by_hand = train(_staged(**pretrained, **{"train.blend": auto.blend}), resized)
    a, b = auto.model.state_dict(), by_hand.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and auto.blended_val == by_hand.blended_val


def test_ensemble_trains_its_members_from_one_start_and_averages_their_logits(resized, tmp_path, pretrained):
    """train.ensemble 2: the first member is the plain staged run, the second trains all layers again from the
    frozen phase's end (epochs numbered on); the model outputs the mean of their logits, and keeps it through its
    file; that file as a run's weights gives the first member."""
    params = _staged(**pretrained, **{"train.ensemble": 2, "train.blend": 1.0})
    assert [(p.first, p.last, p.frozen, p.member) for p in Recipe.from_params(params, True).phases] == \
        [(1, 1, True, 1), (2, 3, False, 1), (4, 5, False, 2)]
    full = Recipe.from_params(params_from_dict(small_params(**{"model.finetune": "full", "train.epochs": 2,
                                                                "train.ensemble": 3})), pretrained=False)
    assert [(p.first, p.last, p.member) for p in full.phases] == [(1, 2, 1), (3, 4, 2), (5, 6, 3)]
    assert full.train.select == "last"  # select auto follows an ensemble set by hand

    plain = train(_staged(**pretrained, **{"train.blend": 1.0}), resized)
    both = train(params, resized)
    model = both.model
    assert [r.epoch for r in both.history] == [1, 2, 3, 4, 5] and both.epochs == 5 and len(model.members) == 1
    first = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    second = {k.removeprefix("members.0."): v for k, v in model.state_dict().items() if k.startswith("members.0.")}
    assert all(torch.equal(v, plain.model.backbone.state_dict()[k]) for k, v in first.items())
    assert not torch.equal(first["features.0.0.weight"], second["features.0.0.weight"])
    x = _x(4, 32, seed=3)
    alone = []
    for weights in (first, second):
        member, _ = build_model(SMALL, model.classes)
        member.backbone.load_state_dict(weights)
        alone.append(member.eval()(x))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), (alone[0] + alone[1]) / 2)
        model.tta = "flip"
        with model.one_view():
            mirrored = (model(x) + model(x.flip(-1))) / 2
        torch.testing.assert_close(model(x), mirrored)

    model.tta = "none"
    first_alone, _ = build_model(SMALL, model.classes)
    first_alone.backbone.load_state_dict(first)
    labels = torch.tensor([0, 1, 1, 0])  # Grad-CAM shows the first member's evidence
    np.testing.assert_allclose(grad_cam(model, x, labels), grad_cam(first_alone, x, labels), atol=1e-5)

    loss, accuracy = both.ensemble_val
    assert both.kept_val_accuracy() == accuracy and len(both.members_val) == 2
    assert both.members_val[0] == (both.history[2].val_loss, both.history[2].val_accuracy)
    assert both.members_val[1] == (both.history[4].val_loss, both.history[4].val_accuracy)
    assert f"then the ensemble of 2 all-layer runs, each's last epoch (3, 5), logits averaged (train.ensemble): " \
           f"val loss {loss:.4f}, accuracy {accuracy:.4f}, each alone " in both.selected_reason
    assert both.decisions["ensemble"].startswith("2: train.ensemble (the ensemble of 2")

    model.tta = "flip"
    save_model(model, tmp_path / "model.pt", size=32, arch=SMALL, mode="center_crop")
    loaded, _ = load_model(tmp_path / "model.pt")
    assert len(loaded.members) == 1 and loaded.tta == model.tta
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    state, info = read_weights(SMALL, str(tmp_path / "model.pt"), 2)
    assert all(torch.equal(state[k], v) for k, v in first.items()) and info.loaded == len(first)
    assert ensemble_state([{"backbone.a": x}, {"backbone.a": x + 1}]).keys() == {"backbone.a", "members.0.a"}

    # train.refit members: the first member as before; the second learns from train + val, so nothing validates it,
    # and the ensemble has no held-out score: only the first member's is reported
    seen = train(dataclasses.replace(params, train=dataclasses.replace(params.train, refit="members")), resized)
    assert [r.val_loss for r in seen.history[:3]] == [r.val_loss for r in both.history[:3]]
    assert all(math.isnan(r.val_loss) for r in seen.history[3:]) and len(seen.history) == 5
    assert "val_loss" not in seen.history[4].metrics() and "train_loss" in seen.history[4].metrics()
    assert math.isnan(seen.kept_val_accuracy()) and seen.members_val[0] == both.members_val[0]
    assert "members after the first trained on train + val (train.refit members), so only the first has a val " \
           f"score: val loss {both.members_val[0][0]:.4f}" in seen.selected_reason
    n_train, n_val = (len(read_split(resized, split)[1]) for split in ("train", "val"))
    assert seen.refit_images == n_train + n_val
    second_seen = {k: v for k, v in seen.model.state_dict().items() if k.startswith("members.0.")}
    assert not torch.equal(second_seen["members.0.features.0.0.weight"], second["features.0.0.weight"])


def test_refit_members_feeds_the_further_members_train_and_val_and_validates_them_on_nothing(resized, pretrained):
    params = _staged(**pretrained, **{"train.ensemble": 3, "train.refit": "members", "train.batch_size": 4})
    recipe = Recipe.from_params(params, pretrained=True)
    model, _ = build_model(SMALL, read_meta(resized)["classes"])
    labels = read_split(resized, "train")[1]
    data = PhaseData(resized, TRAIN_VAL, False, 4, torch.device("cpu"), None, torch.Generator().manual_seed(0),
                     Dist(), labels)
    n_train, n_val = len(labels), len(read_split(resized, "val")[1])
    images = [(sum(len(y) for _, y in setup.train_batches), sum(len(y) for _, y in setup.val_batches))
              for setup in (setup_phase(p, recipe, model, data) for p in recipe.phases[1:])]
    assert images == [(n_train, n_val), (n_train + n_val, 0), (n_train + n_val, 0)]


@pytest.mark.parametrize("killed_after", [3, 4], ids=["between-members", "in-member-2"])
def test_ensemble_resumes_exactly_between_and_inside_its_members(resized, tmp_path, pretrained, killed_after):
    params = _staged(**pretrained, **{"train.ensemble": 2, "train.epochs": 3})
    straight = train(params, resized)
    with pytest.raises(Killed):
        train(params, resized, on_epoch=kill_at(killed_after + 1), checkpoint=tmp_path / "ckpt.pt")
    resume = find_resumable(tmp_path / "ckpt.pt", params, resized)
    assert resume["epoch"] == killed_after and len(resume["members"]) == killed_after - 3
    resumed = train(params, resized, checkpoint=tmp_path / "ckpt.pt", resume=resume)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.ensemble_val == resumed.ensemble_val


@pytest.mark.parametrize("probe_val,mode", [(0.99, "head"), (0.97, "head"), (0.9, "staged"), (math.nan, "staged")])
def test_finetune_auto_is_head_when_the_probe_is_already_right_on_val_else_staged(probe_val, mode):
    params = params_from_dict(small_params(**{"model.finetune": "auto"}))
    decided = Recipe.from_params(params, pretrained=True).decide(probe_val)
    assert decided.finetune == mode and decided.auto
    assert decided.finetune_reason().startswith(f"{mode}: ")
    assert "model.finetune auto" in decided.finetune_reason()
    random_init = Recipe.from_params(params, pretrained=False).decide()
    assert random_init.finetune == "full" and random_init.finetune_reason().startswith("full: random init")
    by_hand = Recipe.from_params(dataclasses.replace(params, model=dataclasses.replace(params.model,
                                                                                         finetune="head")), True)
    assert by_hand.decide(0.5) is by_hand


def test_auto_keeps_staged_when_its_warmup_fits_the_budget_auto_gives_all_layers():
    # 3 warmup epochs leave no room in the 4 epochs a head gets, but they do in the 15 all layers get
    auto = {"model.finetune": "auto", "train.epochs": "auto", "train.warmup_epochs": 3}
    learns = Recipe.from_params(params_from_dict(small_params(**auto)), pretrained=True).decide(0.9)
    assert (learns.finetune, learns.train.epochs, learns.phases[1].epochs) == ("staged", AUTO_EPOCHS_ALL_LAYERS, 14)
    by_hand = Recipe.from_params(params_from_dict(small_params(**{**auto, "train.epochs": 4})), pretrained=True)
    assert by_hand.decide(0.9).finetune == "full"  # 4 epochs: 1 frozen would leave 3, all warmup


def test_auto_budget_gives_all_layers_a_real_budget_at_one_rate_only_when_auto_chose_them_for_new_images():
    auto = {"model.finetune": "auto", "train.epochs": "auto", "train.backbone_lr_mult": "auto"}
    params = params_from_dict(small_params(**auto))
    learns = Recipe.from_params(params, pretrained=True).decide(0.9)  # the probe: the backbone has to learn
    assert learns.finetune == "staged" and learns.learns_new_domain
    assert (learns.train.epochs, learns.train.backbone_lr_mult) == (AUTO_EPOCHS_ALL_LAYERS, 1.0) == (15, 1.0)
    # two all-layer runs from the frozen phase's end, numbered on
    assert [(p.first, p.last, p.frozen, p.member) for p in learns.phases] == [(1, 1, True, 1), (2, 15, False, 1),
                                                                              (16, 29, False, 2)]
    assert (learns.members, learns.total_epochs) == (AUTO_ENSEMBLE_ALL_LAYERS, 29) == (2, 29)
    new_images = "all layers learn images unlike the pretrained ones (model.finetune auto chose staged)"
    assert (learns.train.select, learns.train.blend, learns.blends) == ("last", 1.0, False)  # the end, unblended
    assert learns.budget_reasons() == {
        "epochs": f"15: {new_images}; train.epochs auto",
        "backbone_lr_mult": f"1: {new_images}; train.backbone_lr_mult auto",
        "select": f"last: the last epoch: {new_images}; train.select auto",
        "blend": f"1: {new_images}; train.blend auto",
        "ensemble": f"2: 2 all-layer runs, logits averaged: {new_images}; train.ensemble auto",
        "refit": f"members: the ensemble's members after the first train on train + val, the first keeps val to "
                 f"validate on: {new_images}; train.refit auto"}
    assert learns.describe()[1].startswith("14 epochs: all layers, head lr 0.001, backbone lr 0.001,")
    assert "blended" not in learns.describe()[1] and "train + val" not in learns.describe()[1]
    assert learns.describe()[2].startswith("14 epochs: all layers again from where they started, as before, on "
                                           "train + val (nothing held out) (ensemble member 2 of 2")
    assert [learns.trains_on_val(p) for p in learns.phases] == [False, False, True]
    head = Recipe.from_params(params, pretrained=True).decide(0.99)  # features that already separate the classes
    assert (head.finetune, head.train.epochs, head.train.backbone_lr_mult) == ("head", AUTO_EPOCHS, 0.1) == \
        ("head", 4, 0.1)
    assert head.budget_reasons() == {
        "epochs": "4: model.finetune head (auto); train.epochs auto",
        "backbone_lr_mult": "0.1: model.finetune head (auto), where no backbone trains at its own rate: unused; "
                            "train.backbone_lr_mult auto",
        "select": "best: the lowest val loss: model.finetune head (auto); train.select auto",
        "ensemble": "1: one model: model.finetune head (auto); train.ensemble auto",
        "refit": "false: val held out: model.finetune head (auto); train.refit auto"}
    assert (head.members, head.total_epochs) == (1, 4)
    scratch = Recipe.from_params(params, pretrained=False).decide()  # random init: full, the shipped 4 epochs
    assert (scratch.finetune, scratch.train.epochs) == ("full", 4) and not scratch.learns_new_domain
    by_hand = Recipe.from_params(params_from_dict(small_params(**{**auto, "model.finetune": "staged"})), True)
    by_hand = by_hand.decide(0.5)  # a mode set by hand keeps the shipped budget, the best epoch, blend's candidates
    assert (by_hand.train.epochs, by_hand.train.select, by_hand.train.blend, by_hand.blends) == (4, "best", "auto",
                                                                                                  True)
    assert by_hand.members == 1
    numbers = params_from_dict(small_params(**{**auto, "train.epochs": 6, "train.backbone_lr_mult": 0.3,
                                               "train.select": "best", "train.blend": 0.5, "train.ensemble": 1,
                                               "train.refit": False}))
    kept = Recipe.from_params(numbers, pretrained=True).decide(0.9)
    assert (kept.train.epochs, kept.train.backbone_lr_mult, kept.train.select, kept.train.blend,
            kept.budget_reasons()) == (6, 0.3, "best", 0.5, {})


def test_finetune_auto_trains_as_the_mode_the_probe_chose(resized, pretrained):
    """The run decides on the linear probe's val accuracy, says so, and ends bitwise where that mode set by hand
    ends; from random init auto is full."""
    auto = train(_staged(**pretrained, **{"model.finetune": "auto"}), resized)
    mode = "head" if auto.probe.val_accuracy >= AUTO_HEAD else "staged"
    assert auto.decisions["finetune"].startswith(f"{mode}: the linear probe on the pretrained features scores "
                                                 f"{auto.probe.val_accuracy:.4f} on val")
    # auto's all-layer end is kept unblended, the ensemble of two such runs
    decided = {"train.blend": 1.0, "train.ensemble": 2, "train.refit": "members"} if mode == "staged" else {}
    by_hand = train(_staged(**pretrained, **{"model.finetune": mode}, **decided), resized)
    a, b = auto.model.state_dict(), by_hand.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal([r.val_loss for r in auto.history], [r.val_loss for r in by_hand.history])
    scratch = train(_staged(**{"model.finetune": "auto", "train.epochs": 2}), resized)
    assert scratch.decisions["finetune"].startswith("full: random init") and scratch.probe is None


@pytest.mark.parametrize("overrides,words", [
    ({"train.head_epochs": 0}, "train.head_epochs = 0: allowed with model.finetune staged: 1 to"),
    ({"train.head_epochs": 3}, "train.head_epochs = 3"),
    ({"train.warmup_epochs": 2.0}, "fewer than the second phase's"),
    ({"train.backbone_lr_mult": 0.0}, "train.backbone_lr_mult = 0.0: allowed: auto or a finite number > 0"),
    ({"evaluate.tta": "five-crop"}, "evaluate.tta = 'five-crop': allowed: none | flip | dihedral | auto"),
    ({"train.ensemble": 0}, "train.ensemble = 0: allowed: an integer >= 1"),
    ({"train.refit": "members", "train.ensemble": 1}, "train.refit = members: the ensemble's members after the first "
                                                      "train on train + val: allowed with train.ensemble auto or > 1"),
    ({"train.ensemble": 2, "train.select": "best"}, "train.ensemble = 2: each member keeps its last epoch: allowed "
                                                     "with train.select last or auto"),
])
def test_bad_staged_and_tta_params_are_rejected(overrides, words):
    with pytest.raises(ConfigError) as err:
        _staged(**overrides)
    assert words in str(err.value)


# ------------------------------------------------------------------------------------------------ TTA


def test_flip_tta_on_a_mirror_symmetric_image_equals_no_tta(tmp_path):
    model, _ = build_model("resnet18", ["a", "b"])
    model.eval()
    half = _x(3, 32)[..., :16]
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    other = _x(3, 32, seed=1)
    plain, plain_other, plain_mirror = model(symmetric), model(other), model(other.flip(-1))
    model.tta = "flip"
    torch.testing.assert_close(model(symmetric), plain)
    torch.testing.assert_close(model(other), (plain_other + plain_mirror) / 2)
    assert not torch.allclose(model(other), plain_other)
    # the choice travels with the model file
    save_model(model, tmp_path / "m.pt", size=32, arch="resnet18", mode="center_crop")
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.tta == "flip" and torch.equal(loaded(other), model(other))
    model.train()
    torch.testing.assert_close(model(other[:2]), model.backbone((other[:2].float() - model.mean) / model.std))


def test_dihedral_tta_averages_the_eight_turns_and_mirrors_and_travels_with_the_model(tmp_path):
    model, _ = build_model("resnet18", ["a", "b"])
    model.eval()
    x = _x(2, 32)
    views = [v for k in range(4) for t in [torch.rot90(x, k, (-2, -1))] for v in (t, t.flip(-1))]
    plain = [model(v) for v in views]
    model.tta = "dihedral"
    torch.testing.assert_close(model(x), sum(plain) / 8)
    # what it averages over is the same for every turn and mirror of an image: the output does not move
    torch.testing.assert_close(model(torch.rot90(x, 1, (-2, -1))), model(x))
    torch.testing.assert_close(model(x.flip(-2)), model(x))
    assert not torch.allclose(model(x), plain[0])
    with pytest.raises(ValueError, match="run the images through the model"):
        model.from_features(torch.zeros(1, 512), torch.zeros(1, 512))
    save_model(model, tmp_path / "m.pt", size=32, arch="resnet18", mode="center_crop")
    assert load_model(tmp_path / "m.pt")[0].tta == "dihedral"


def _oriented_set(root, up: bool):
    """Two classes told apart by where the light is (``up``: a bright top half or a bright bottom half) or by
    colour alone (red or blue): turned a quarter, the first are neither class; the second are still theirs."""
    import numpy as np
    from PIL import Image

    from tests.conftest import build_dataset

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "raw" / label).mkdir(parents=True)
        for i in range(24):
            pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            if up:
                rows = slice(0, 16) if label == "a" else slice(16, 32)
                pixels[rows] += 180
            else:
                pixels[..., 0 if label == "a" else 2] += 180
            Image.fromarray(pixels).save(root / "raw" / label / f"{label}{i}.png")
    return build_dataset(root, source="folder")


@pytest.mark.parametrize("up,tta", [(True, "none"), (False, "dihedral")])
def test_tta_auto_turns_the_images_only_where_they_have_no_up(tmp_path, up, tta):
    data = _oriented_set(tmp_path / "set", up)
    torch.manual_seed(1)  # resnet18's random features keep where the light is (MobileNetV3's collapse at 32 px)
    weights = _save(tmp_path / "resnet18.pth", get_model("resnet18").state_dict())
    result = train(_staged(**{"model.arch": "resnet18", "model.weights": weights, "model.finetune": "head",
                              "train.epochs": 1, "evaluate.tta": "auto"}), data)
    decision = result.decisions["tta"]
    assert result.tta == tta and decision.startswith(f"{tta}: ") and decision.endswith("(evaluate.tta auto)")
    turned, mirrored = (float(v) for v in re.findall(r"(?:quarter|mirrors) (\d+\.\d+)", decision))
    assert (turned > TURN_RATIO * mirrored + TURN_SLACK) == up, decision
    if up:
        return
    # without pretrained features there is no probe to ask
    scratch = train(_staged(**{"model.finetune": "full", "train.epochs": 1, "evaluate.tta": "auto"}), data)
    assert scratch.tta == "none" and scratch.decisions["tta"].startswith("none: no pretrained features")


# ------------------------------------------------------------------------------------------------ the pipeline


@pytest.mark.slow
def test_pipeline_refuses_a_bad_weights_file_then_trains_staged_from_a_backbone_only_one(tmp_path, imagenet_like,
                                                                                         monkeypatch, capsys):
    import numpy as np
    from stages.audit import main as audit

    from kennel.cli.predict import resolve_model
    from kennel.model.inference import load_model_file, predict_arrays
    from tests.conftest import make_project, project_runs, run_stages, write_params

    body = {k: v for k, v in imagenet_like.items() if not k.startswith("classifier.3.")}
    bad = _save(tmp_path / "bad.pth", _missing(body))
    body = {f"encoder.{k}": v for k, v in body.items()}  # as self-supervised code writes them
    params = small_params(**{"model.arch": SMALL, "model.weights": bad, "model.finetune": "staged",
                             "train.epochs": 2, "train.head_epochs": 1, "evaluate.tta": "flip"})
    root = make_project(tmp_path / "project", params)
    # the stages in-process: what they refuse, write and log (`dvc repro` runs them in test_pipeline.py)
    run_stages(root, ["prepare", "resize"], monkeypatch)
    capsys.readouterr()
    assert audit([]) == 2
    # the audit stage builds the backbone first (to embed the images), and stops with the same message
    assert f"kennel audit: error: {bad}: not a {SMALL} state dict: missing keys ['features.2.block.0.0.weight']" \
        in capsys.readouterr().err
    assert not (root / "models").exists()  # nothing written
    assert not (root / "mlflow.db").exists() or not project_runs(root)[1]  # no MLflow run

    params["model"]["weights"] = _save(tmp_path / "body.pth", body)
    write_params(root / "params.yaml", params)
    run_stages(root, ["audit", "train", "evaluate"], monkeypatch)
    client, runs = project_runs(root)
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["kennel.weights_at_init"] == "classifier.3.weight,classifier.3.bias"
    assert tags["kennel.weights_loaded"] == str(len(body)) and tags["kennel.tta"] == "flip"
    # the model file and the logged (exported) model both predict with the flip, identically
    from_file = load_model_file(root / "models/model.pt")
    from_run = resolve_model(runs[0].info.run_id, root)
    assert from_file.module.tta == "flip"
    images = np.array(read_split(root / "data/resized", "test")[0][:4])
    np.testing.assert_allclose(predict_arrays(images, from_run), predict_arrays(images, from_file), atol=1e-5)


def test_batchnorm_shift_is_near_zero_on_the_images_the_statistics_came_from():
    from kennel.model.statistics import batchnorm_shift

    torch.manual_seed(0)
    model, _ = build_model("resnet18", ["a", "b"])
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    before = batchnorm_shift(model, x)  # random init: running mean 0, variance 1, far from these activations
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one pass sets the statistics of this very batch
    model.train()
    with torch.no_grad():
        model(x)
    after = batchnorm_shift(model, x)
    assert after < 0.05 < before and model.training  # measuring leaves the mode as it was
    assert batchnorm_shift(torch.nn.Linear(2, 2), torch.zeros(1, 2)) is None


def test_auto_batchnorm_is_decided_by_the_shift_and_says_why(resized, pretrained):
    from kennel.train.recipe import BN_SHIFT

    params = _staged(**pretrained)
    near = Recipe.from_params(params, pretrained=True)
    assert near.measures_bn and near.freeze_bn  # not measured: kept, as before
    assert dataclasses.replace(near, bn_shift=BN_SHIFT / 2).freeze_bn
    far = dataclasses.replace(near, bn_shift=BN_SHIFT * 1.5)
    assert not far.freeze_bn and far.batchnorm_reason().startswith("updated: the train images sit 0.30 from")
    assert not Recipe.from_params(params, pretrained=False).freeze_bn
    assert not Recipe.from_params(_staged(**{"model.finetune": "head"}), pretrained=True).measures_bn
    result = train(params, resized)  # measured on the run's own train images, logged, kept on the result
    decision = result.decisions["batchnorm"]
    assert decision.startswith(("kept: the train images sit", "updated: the train images sit")), decision
