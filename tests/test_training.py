"""Training engine: resume, determinism, head-mode feature caching, schedules, augmentation, selection."""

import logging
import math

import numpy as np
import pytest
import torch

from kennel.core.errors import ConfigError
from kennel.core.params import params_from_dict
from kennel.data.shards import read_split
from kennel.model.network import build_model
from kennel.train.augment import Augment, Mix
from kennel.train.batches import Batches, batch_order
from kennel.train.checkpoint import mark_complete
from kennel.train.fine_tune import find_resumable, seed_everything, selection_reason, train
from kennel.train.loop import EpochResult, FitState, StepConfig, fit
from kennel.train.optim import WarmupCosine, build_optimizer, build_scheduler
from kennel.train.recipe import Recipe
from tests.conftest import Killed, build_dataset, kill_at, make_params, small_params


def _equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_killed_run_resumes_to_the_exact_same_weights(resized, tmp_path):
    params = make_params(**{"train.epochs": 3, "train.select": "last"})  # augment + cosine schedule from params.yaml
    full = train(params, resized, checkpoint=tmp_path / "full.pt")
    with pytest.raises(Killed):  # epoch 1 is checkpointed; the run dies before epoch 2's checkpoint
        train(params, resized, on_epoch=kill_at(2), checkpoint=tmp_path / "ckpt.pt")
    resume = find_resumable(tmp_path / "ckpt.pt", params, resized)
    assert resume is not None and resume["epoch"] == 1
    resumed = train(params, resized, checkpoint=tmp_path / "ckpt.pt", resume=resume)
    assert resumed.resumed_from == 1
    _equal_states(full.model.state_dict(), resumed.model.state_dict())
    strip = lambda h: [(r.epoch, r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy, r.lr) for r in h]
    assert strip(resumed.history) == strip(full.history)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 3


def test_patience_counts_epochs_without_a_lower_val_loss_within_the_phase():
    state = FitState()
    for epoch, loss in enumerate([0.9, 0.7, 0.8, 0.75], start=1):
        state.history.append(EpochResult(epoch, 1.0, 0.5, loss, 0.5, 1e-3, seconds=1.0, images_per_second=1.0))
        state.consider(state.history[-1], torch.nn.Linear(1, 1))
    assert state.best_epoch == 2 and state.stale(2) and not state.stale(3) and not state.stale(0)
    assert not state.stale(2, since=3)  # a phase that began after epoch 3 has had one epoch, not two


def test_patience_stops_training_and_a_resumed_run_stops_where_it_would_have(resized, tmp_path):
    params = make_params(**{"train.epochs": 6, "train.patience": 1, "train.lr": 0.003, "train.select": "best"})
    full = train(params, resized, checkpoint=tmp_path / "full.pt")  # a rate that makes val loss climb
    stopped = full.history[-1].epoch
    assert stopped < 6 and stopped - max(r.epoch for r in full.history if r.epoch == full.selected_epoch) == 1
    assert f"training stopped after epoch {stopped}: val loss had not improved for 1 epochs" in full.selected_reason
    with pytest.raises(Killed):
        train(params, resized, on_epoch=kill_at(stopped), checkpoint=tmp_path / "ckpt.pt")
    resumed = train(params, resized, checkpoint=tmp_path / "ckpt.pt",
                    resume=find_resumable(tmp_path / "ckpt.pt", params, resized))
    assert [r.epoch for r in resumed.history] == [r.epoch for r in full.history]
    _equal_states(full.model.state_dict(), resumed.model.state_dict())


def test_checkpoint_from_other_params_or_data_is_not_resumed(resized, tmp_path, caplog):
    params = make_params(**{"train.epochs": 1})
    train(params, resized, checkpoint=tmp_path / "ckpt.pt")
    assert find_resumable(tmp_path / "ckpt.pt", params, resized) is not None
    # speed-only knobs and where the run is recorded do not invalidate it
    ckpt = tmp_path / "ckpt.pt"
    assert find_resumable(ckpt, make_params(**{"train.epochs": 1, "train.num_workers": 2}), resized)
    assert find_resumable(ckpt, make_params(**{"train.epochs": 1, "mlflow.registered_model": ""}), resized)
    with caplog.at_level(logging.INFO):
        assert find_resumable(ckpt, make_params(**{"train.epochs": 1, "train.lr": 0.01}), resized) is None
    assert "made with other params or data" in caplog.text
    other_data = build_dataset(tmp_path / "other", per_class=16, seed=5)
    assert find_resumable(tmp_path / "ckpt.pt", params, other_data) is None
    unfinished = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    mark_complete(tmp_path / "ckpt.pt")  # what the train stage does once everything is logged
    finished = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert finished["complete"] is True and "optimizer" not in finished and "best_state" not in finished
    assert all(torch.equal(finished["model"][k], v) for k, v in unfinished["model"].items())
    assert finished["history"] == unfinished["history"] and finished["epoch"] == unfinished["epoch"]
    with caplog.at_level(logging.INFO):
        assert find_resumable(tmp_path / "ckpt.pt", params, resized) is None
    assert "belongs to a run that finished" in caplog.text
    (tmp_path / "ckpt.pt").write_bytes(b"torn")
    with caplog.at_level(logging.WARNING):
        assert find_resumable(tmp_path / "ckpt.pt", params, resized) is None
    assert "unreadable" in caplog.text


def test_same_seed_same_weights_with_augmentation(resized):
    params = make_params()
    assert params.train.augment.enabled
    _equal_states(train(params, resized).model.state_dict(), train(params, resized).model.state_dict())


def test_resident_and_streamed_data_train_identically(resized):
    on = train(make_params(**{"train.data_on_device": True, "train.amp": "off"}), resized)
    off = train(make_params(**{"train.data_on_device": False, "train.amp": "off"}), resized)
    assert (on.data_placement, off.data_placement) == ("device", "stream")
    _equal_states(on.model.state_dict(), off.model.state_dict())


def test_head_mode_cached_features_equal_training_the_frozen_model(resized):
    params = make_params(**{"model.finetune": "head", "train.amp": "off", "train.select": "last", "train.epochs": 3,
                        "train.data_on_device": True, "train.head_init": "random"})
    cached = train(params, resized).model

    # the same run without the cache: the frozen model sees the raw (un-augmented) images every epoch
    t = params.train
    generator = seed_everything(params.seed)
    model, _ = build_model("resnet18", ["cat", "dog"], "none")
    model.set_frozen(True)
    model = model.to(memory_format=torch.channels_last)
    x, y = read_split(resized, "train")
    vx, vy = read_split(resized, "val")
    train_b = Batches(torch.from_numpy(np.array(x)), torch.from_numpy(y), t.batch_size, True, generator)
    val_b = Batches(torch.from_numpy(np.array(vx)), torch.from_numpy(vy), t.batch_size)
    opt = build_optimizer(t.optimizer, model.parameters(), t.lr, t.momentum, t.weight_decay)
    sched = build_scheduler(t.schedule, opt, t.epochs, len(train_b), t.warmup_epochs)
    step = StepConfig(scheduler=sched, generator=generator,
                criterion=torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing))
    fit(model, train_b, val_b, opt, t.epochs, torch.device("cpu"), step)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(cached.backbone.fc, name), getattr(model.backbone.fc, name),
                                   rtol=1e-4, atol=1e-5)
    _equal_states({k: v for k, v in cached.state_dict().items() if ".fc." not in k and not k.startswith("backbone.fc")},
                  {k: v for k, v in model.state_dict().items() if ".fc." not in k and not k.startswith("backbone.fc")})


def test_select_best_keeps_the_best_validation_epoch(resized):
    result = train(make_params(**{"train.epochs": 3, "train.lr": 0.01, "train.select": "best"}), resized)
    scores = [(-r.val_loss, r.val_accuracy) for r in result.history]
    assert result.selected_epoch == 1 + scores.index(max(scores))
    last = train(make_params(**{"train.epochs": 3, "train.lr": 0.01, "train.select": "last"}), resized)
    assert last.selected_epoch == 3
    if result.selected_epoch != 3:
        assert not torch.equal(result.model.backbone.fc.weight, last.model.backbone.fc.weight)


def test_selection_keeps_the_lowest_val_loss_when_accuracies_tie_and_says_why():
    state, model = FitState(), torch.nn.Linear(1, 1)
    history = [EpochResult(e, 0, 0, loss, acc, 0.1, 1, 1)
               for e, acc, loss in [(1, 0.95, 0.30), (2, 0.98, 0.20), (3, 0.98, 0.12), (4, 0.98, 0.15)]]
    for r in [*history, EpochResult(5, 0, 0, math.nan, math.nan, 0.1, 1, 1)]:
        state.consider(r, model)
    assert state.best_epoch == 3
    assert selection_reason(history, 3, "best") == "lowest val loss 0.1200 (val accuracy 0.9800, as in epochs 2, 4)"
    assert selection_reason(history, 4, "last") == "train.select: last"


def test_selection_prefers_a_lower_val_loss_to_a_higher_accuracy_and_says_so():
    state, model = FitState(), torch.nn.Linear(1, 1)
    history = [EpochResult(1, 0, 0, 0.40, 0.99, 0.1, 1, 1), EpochResult(2, 0, 0, 0.10, 0.97, 0.1, 1, 1)]
    for r in history:
        state.consider(r, model)
    assert state.best_epoch == 2
    assert selection_reason(history, 2, "best") == ("lowest val loss 0.1000 (val accuracy 0.9700); epoch 1 had "
                                                    "val accuracy 0.9900 at a higher loss")


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["none", "cosine", "onecycle"])
def test_each_optimizer_and_schedule_builds_frommake_params(resized, name, schedule):
    params = make_params(**{"train.optimizer": name, "train.schedule": schedule, "train.nesterov": name == "sgd",
                        "train.grad_clip": 1.0, "train.label_smoothing": 0.1, "train.epochs": 1})
    result = train(params, resized)
    assert result.history[0].lr > 0 and math.isfinite(result.history[0].train_loss)


def test_warmup_cosine_shape():
    f = WarmupCosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    opt = build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler("onecycle", opt, epochs=2, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step() if len(lrs) < 9 else None
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.01
    with pytest.raises(ValueError, match="train.schedule = 'step'"):
        build_scheduler("step", opt, 1, 1)


BAD = [
    ("train.schedule", "step", "none | cosine | onecycle"),
    ("train.warmup_epochs", 5.0, "fewer than train.epochs"),
    ("train.grad_clip", -1.0, ">= 0"),
    ("train.label_smoothing", 1.0, "[0, 1)"),
    ("train.nesterov", "yes", "true or false"),
    ("train.compile", 1, "true or false"),
    ("train.data_on_device", "maybe", "auto | true | false"),
    ("train.data_on_device", 1, "auto | true | false"),
    ("train.select", "worst", "best | last"),
    ("train.nproc", 0, ">= 1"),
    ("train.batch_size", 33, "multiple of train.nproc"),
    ("train.augment.flip", 1.5, "[0, 1]"),
    ("train.augment.scale_min", 0.0, "0 < scale_min"),
    ("train.augment.ratio_max", 0.5, "ratio_min <= ratio_max"),
    ("train.augment.policy", "autoaugment", "none | trivial | randaugment"),
    ("train.augment.mixup", -0.2, ">= 0"),
    ("train.augment.cutmix", "yes", "number"),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_training_params_are_rejected(key, value, words):
    raw = small_params(**{"train.nproc": 2} if key == "train.batch_size" else {})
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    assert key.split(".")[-1].split("_")[0] in str(err.value) and words in str(err.value)


def test_nesterov_needs_sgd():
    with pytest.raises(ConfigError, match="nesterov"):
        params_from_dict(small_params(**{"train.nesterov": True, "train.optimizer": "adamw"}))


# ------------------------------------------------------------------------------------ augmentation on CPU tensors


def _images(b=4, s=16):
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_augment_identity_and_flip_are_exact():
    x = _images()
    same = Augment(flip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(same, x.float(), rtol=0, atol=1e-3)
    flipped = Augment(flip=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(flipped, x.float().flip(-1), rtol=0, atol=1e-3)
    assert flipped.dtype == torch.float32 and flipped.is_contiguous(memory_format=torch.channels_last)


def test_vertical_flips_and_quarter_turns_are_exact_and_all_drawn():
    x = _images(64)
    whole = dict(flip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    upside_down = Augment(**whole, vflip=1.0)(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(upside_down, x.float().flip(-2), rtol=0, atol=1e-3)
    turned = Augment(**whole, rot90=True)(x, torch.Generator().manual_seed(1))
    turns = []
    for image, out in zip(x.float(), turned, strict=True):
        (k,) = [k for k in range(4) if torch.allclose(out, image.rot90(k, (-2, -1)), atol=1e-3)]
        turns.append(k)
    assert set(turns) == {0, 1, 2, 3}  # every quarter turn occurs, each image exactly one of them
    # off, they draw nothing: the default recipe's crops are what they always were
    plain = Augment()(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(Augment(vflip=0.0, rot90=False)(x, torch.Generator().manual_seed(5)), plain)


def test_a_policy_changes_each_image_on_its_own_and_mixing_gives_class_shares():
    x = _images(16)
    whole = dict(flip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.manual_seed(0)
    out = Augment(**whole, policy="trivial")(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255
    changed = [not torch.allclose(o, i.float(), atol=1e-3) for o, i in zip(out, x, strict=True)]
    assert 0 < sum(changed)  # most images get an op that changes them (identity is one of the ops)
    torch.manual_seed(0)
    again = Augment(**whole, policy="trivial")(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, out)  # seeded: the checkpoint's global generator repeats it
    labels = torch.arange(16) % 4
    for mix in (Mix(0.4, 0.0, 4), Mix(0.0, 1.0, 4), Mix(0.4, 1.0, 4)):
        images, targets = mix(x.float(), labels)
        assert images.shape == x.shape and targets.shape == (16, 4)
        torch.testing.assert_close(targets.sum(1), torch.ones(16))
        assert (targets.max(1).values < 1).any()  # some images really are mixed
    assert Mix.from_params(make_params().train.augment, 4) is None  # shipped: off


def test_mixup_trains_on_soft_labels_and_reports_accuracy_against_the_own_label(resized):
    result = train(make_params(**{"train.augment.mixup": 0.4, "train.augment.cutmix": 1.0,
                                  "train.augment.policy": "randaugment"}), resized)
    assert all(0 <= r.train_accuracy <= 1 and r.train_loss > 0 for r in result.history)
    assert "randaugment policy, mixup 0.4, cutmix 1" in Recipe.from_params(
        make_params(**{"train.augment.mixup": 0.4, "train.augment.cutmix": 1.0,
                       "train.augment.policy": "randaugment"}), pretrained=False).decide().describe()[0]


def test_augment_crop_is_a_resized_region():
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    out = Augment(flip=0.0, scale=(0.25, 0.25), ratio=(1.0, 1.0))(x, torch.Generator().manual_seed(3))
    # an 8x8 window upsampled 2x: every output value lies inside the image's range and the result is smooth
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
    row_steps = out[0, 0, :, 1:] - out[0, 0, :, :-1]
    assert torch.allclose(row_steps[:, 2:-2], torch.full_like(row_steps[:, 2:-2], 0.5), atol=1e-4)


def test_augment_is_per_sample_and_seeded():
    x = _images(8)
    aug = Augment()
    a, b = aug(x, torch.Generator().manual_seed(7)), aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(8)))
    same_input = x[:1].expand(8, -1, -1, -1)
    outs = aug(same_input, torch.Generator().manual_seed(7))
    assert len({tuple(o.flatten()[:50].tolist()) for o in outs}) > 1  # different crops within one batch


def test_batch_order_shards_equally_and_covers_everything():
    g = lambda: torch.Generator().manual_seed(0)
    shards = [batch_order(10, 3, True, g(), rank, 3) for rank in range(3)]
    assert [sum(len(b) for b in s) for s in shards] == [3, 3, 3]  # cut to a multiple of the world size
    seen = torch.cat([torch.cat(s) for s in shards])
    assert len(set(seen.tolist())) == 9
    assert [len(b) for b in batch_order(9, 4, True, g())] == [4, 4]  # lone last sample dropped
    assert [len(b) for b in batch_order(9, 4, False, None)] == [4, 4, 1]  # never when evaluating


def test_evaluation_shards_cover_every_image_once():
    """DDP validation: each process evaluates its share; together they see every image exactly once."""
    from kennel.train.batches import BatchSampler

    for n, world in ((10, 3), (2, 4), (9, 1)):
        shards = [torch.cat(batch_order(n, 4, False, None, rank, world) or [torch.empty(0, dtype=torch.long)])
                  for rank in range(world)]
        assert sorted(torch.cat(shards).tolist()) == list(range(n))
        assert [len(BatchSampler(n, 4, False, None, rank, world)) for rank in range(world)] == [
            len(batch_order(n, 4, False, None, rank, world)) for rank in range(world)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_resident_bf16_training(resized):
    result = train(make_params(**{"train.device": "cuda", "train.amp": "auto", "train.epochs": 2}), resized)
    assert result.device.type == "cuda" and result.data_placement == "device"
    assert result.amp_dtype in (torch.bfloat16, torch.float16)
    x = _images(4).cuda()
    out = Augment()(x, torch.Generator().manual_seed(0))
    assert out.device.type == "cuda" and out.shape == x.shape


def test_class_weights_are_inverse_frequency_and_the_log_warns_about_imbalance():
    from kennel.train.balance import balance_warnings, class_weights

    assert class_weights(np.array([0] * 6 + [1] * 2), 3).tolist() == pytest.approx([8 / 12, 8 / 4, 0.0])
    assert class_weights(np.array([0, 1, 0, 1]), 2).tolist() == [1.0, 1.0]
    (imbalanced, few) = balance_warnings(np.array([0] * 40 + [1] * 10), np.array([0] * 12 + [1] * 3), ["a", "b"],
                                         weighted=False)
    assert imbalanced.startswith("imbalanced classes: a has 40 train images, b 10 (4.0 x)")
    assert "train.class_weights: auto" in imbalanced and few.startswith("few val images for b (3)")
    assert balance_warnings(np.array([0] * 30 + [1] * 10), np.array([0] * 10 + [1] * 10), ["a", "b"], False) == []


def test_weighted_loss_trains_and_counts_a_rare_class_as_much(resized, caplog):
    from kennel.train.balance import weights_reason

    params = make_params(**{"train.epochs": 1, "train.class_weights": "auto"})
    with caplog.at_level(logging.INFO):
        result = train(params, resized)
    assert result.history and math.isfinite(result.history[-1].train_loss)
    from kennel.train.recipe import Recipe

    y = np.array([0] * 9 + [1])  # train labels: class 1 is rare
    loss = Recipe.from_params(params, pretrained=False).criterion(y, 2)
    logits, targets = torch.tensor([[2.0, -2.0], [2.0, -2.0]]), torch.tensor([0, 1])  # right on 0, wrong on 1
    each = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    w = torch.tensor([10 / 18, 10 / 2])  # n / (classes x count)
    assert loss(logits, targets).item() == pytest.approx(((w * each).sum() / w.sum()).item())
    assert loss(logits, targets).item() > each.mean().item()  # the rare class's error counts 9 x
    # classes within 1.5 x of each other: the plain loss, bit for bit
    near = Recipe.from_params(params, pretrained=False).criterion(np.array([0] * 11 + [1] * 10), 2)
    assert near.weight is None
    assert result.decisions["class_weights"].startswith("none: the classes are within 1.5 x of each other")
    assert weights_reason("auto", y, 2).startswith("inverse frequency: the largest class has 9.0 x")
    assert weights_reason("none", y, 2) == "none: train.class_weights none"
