"""The fine-tuning recipe: how a model is fine-tuned, decided once from params and the weights it starts from.

It owns the phases (fastai's ``fine_tune``: head first, then all layers), what each freezes, the param groups and
their rates, BatchNorm statistics, where the head starts, the optimizer and schedule, the blend back toward the
weights the all-layer phase started from, and what a checkpoint made inside a phase restores. It knows nothing of
data, devices or processes: ``train()``, its refit, ``describe()`` and ``lr-find`` all take one, so what the
range test sweeps is what training runs (Lightning's ``BackboneFinetuning`` plays the same part there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kennel.core.params import (
    AUTO_BACKBONE_LR_MULT,
    AUTO_BACKBONE_LR_MULT_ALL_LAYERS,
    AUTO_BLEND_ALL_LAYERS,
    AUTO_ENSEMBLE,
    AUTO_ENSEMBLE_ALL_LAYERS,
    AUTO_EPOCHS_ALL_LAYERS,
    AUTO_REFIT,
    AUTO_REFIT_ALL_LAYERS,
    AUTO_SELECT,
    AUTO_SELECT_ALL_LAYERS,
    Params,
    TrainConfig,
)
from kennel.model.network import Classifier
from kennel.train.augment import Augment, Mix
from kennel.train.balance import class_weights, weighs
from kennel.train.optim import build_optimizer, build_scheduler

# Mean BatchNorm shift (kennel.model.statistics) from which auto re-estimates the statistics. Measured on the
# training images of three domains under MobileNetV2's ImageNet weights: pet photos 0.11, EuroSAT tiles 0.30,
# chest X-rays 0.26.
BN_SHIFT = 0.2
# Linear-probe val accuracy from which model.finetune auto trains the head alone: the pretrained features already
# separate the classes, and all-layer training has little to add and much to lose on a few hundred photos (real
# pets: probe val 0.99, head 0.988 on photos of another source, all layers 0.982-0.985). Satellite tiles (probe val
# 0.93) and X-rays (0.94) are where the backbone has to learn.
AUTO_HEAD = 0.97
# train.* keys whose auto the recipe settles once it knows whether all layers learn images unlike ImageNet's
AUTO_KEYS = ("epochs", "backbone_lr_mult", "select", "blend", "ensemble", "refit")
# train.blend auto tries these weights of the kept all-layer epoch (one val pass each) and keeps the lowest val
# loss; ties keep the first, the one nearest the fine-tuned weights. 0 is the frozen phase's end itself: whether
# the all-layer phase helped at all is one of the candidates.
BLENDS = (1.0, 0.75, 0.5, 0.25, 0.0)


@dataclass(frozen=True)
class Phase:
    """Epochs ``first..last`` trained with one optimizer and one schedule; frozen = head only, on cached features.
    ``member`` > 1: all layers once more from where the first all-layer phase started, for ``train.ensemble``."""

    index: int
    first: int
    last: int
    frozen: bool
    member: int = 1

    @property
    def epochs(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Recipe:
    """``model.finetune`` and ``train.*`` for a model that starts from pretrained weights or not."""

    finetune: str  # head | staged | full, or auto until ``decide`` settles it
    pretrained: bool  # the backbone holds loaded weights (not random init)
    train: TrainConfig  # train.epochs and backbone_lr_mult as numbers: auto's planned ones until ``decide``
    # how far the train images sit from the pretrained BatchNorm statistics (``kennel.model.statistics``), measured
    # when freeze_bn is auto and an all-layer phase follows; None: not measured
    bn_shift: float | None = None
    # model.finetune auto, once decided: the linear probe's val accuracy it was decided on (NaN: no val split);
    # None: not decided by auto (random init, or a mode set by hand)
    probe_val: float | None = None
    auto: bool = False  # model.finetune was auto
    # what auto trains all layers with when the probe says so: staged, or full when train.epochs leave no room for
    # staged's two phases
    all_layers: str = "staged"
    # which of train.epochs, backbone_lr_mult, select, blend, ensemble and refit were auto (``decide`` sets them)
    auto_budget: frozenset[str] = frozenset()

    @classmethod
    def from_params(cls, params: Params, pretrained: bool) -> Recipe:
        t = params.train
        auto = frozenset(k for k in AUTO_KEYS if getattr(t, k) == "auto")
        ensemble = AUTO_ENSEMBLE if t.ensemble == "auto" else t.ensemble
        # members keep their last epochs: select auto follows an ensemble set by hand
        select = ("last" if ensemble > 1 else AUTO_SELECT) if t.select == "auto" else t.select
        train = dataclasses.replace(t, epochs=t.planned_epochs, backbone_lr_mult=AUTO_BACKBONE_LR_MULT
                                    if t.backbone_lr_mult == "auto" else t.backbone_lr_mult,
                                    select=select, ensemble=ensemble,
                                    refit=AUTO_REFIT if t.refit == "auto" else t.refit)
        return cls(params.model.finetune, pretrained, train, all_layers="staged" if params.stages_fit else "full",
                   auto_budget=auto)

    @property
    def phases(self) -> list[Phase]:
        """``head``: one frozen phase; ``full``: one phase of all layers; ``staged``: ``train.head_epochs`` frozen,
        then all layers with the schedule restarting. With ``train.ensemble`` > 1 the all-layer phase runs that many
        times, each from the weights the first one started from, its epochs numbered on."""
        t = self.train
        if self.finetune == "staged" or (self.finetune == "auto" and self.all_layers == "staged"):
            # auto, undecided: the plan when all layers train
            phases = [Phase(1, 1, t.head_epochs, True), Phase(2, t.head_epochs + 1, t.epochs, False)]
        else:
            phases = [Phase(1, 1, t.epochs, self.finetune == "head")]
        last = phases[-1]
        if last.frozen:
            return phases
        n = last.epochs
        return phases + [Phase(last.index + m - 1, last.first + (m - 1) * n, last.last + (m - 1) * n, False, m)
                         for m in range(2, t.ensemble + 1)]

    @property
    def members(self) -> int:
        """The models the kept one averages: ``train.ensemble`` where all layers train, else 1."""
        return self.phases[-1].member

    @property
    def total_epochs(self) -> int:
        """Epochs over every phase: ``train.epochs`` plus the further ensemble members' all-layer epochs."""
        return self.phases[-1].last

    @property
    def decides_on_probe(self) -> bool:
        """``model.finetune: auto`` from pretrained weights: the linear probe on val decides between head and staged
        (from random init the features mean nothing, and it is ``full``)."""
        return self.finetune == "auto" and self.pretrained

    def decide(self, probe_val: float | None = None) -> Recipe:
        """``model.finetune: auto`` settled: ``head`` when the linear probe's val accuracy ``probe_val`` reaches
        ``AUTO_HEAD``, ``staged`` below it (or without a val split to tell; ``full`` when the epochs leave no room for
        two phases), ``full`` from random init. Any other mode is returned as it is."""
        if self.finetune != "auto":
            return self
        if not self.pretrained:
            return dataclasses.replace(self, finetune="full", auto=True)
        probe_val = math.nan if probe_val is None else probe_val
        mode = "head" if probe_val >= AUTO_HEAD else self.all_layers
        train = self.train
        if mode != "head":  # the backbone has to learn: a real budget, at one rate, its end kept (see AUTO_EPOCHS)
            auto = self.auto_budget
            select = AUTO_SELECT_ALL_LAYERS if "select" in auto else train.select
            train = dataclasses.replace(
                train, epochs=AUTO_EPOCHS_ALL_LAYERS if "epochs" in auto else train.epochs,
                backbone_lr_mult=AUTO_BACKBONE_LR_MULT_ALL_LAYERS if "backbone_lr_mult" in auto
                else train.backbone_lr_mult, select=select,
                blend=AUTO_BLEND_ALL_LAYERS if "blend" in auto else train.blend,
                # members keep their last epochs: with select best (by hand) one model
                ensemble=AUTO_ENSEMBLE_ALL_LAYERS if "ensemble" in auto and select == "last" else train.ensemble)
            if "refit" in auto and train.ensemble > 1:  # further members to train on val (see AUTO_REFIT)
                train = dataclasses.replace(train, refit=AUTO_REFIT_ALL_LAYERS)
        return dataclasses.replace(self, finetune=mode, probe_val=probe_val, auto=True, train=train)

    @property
    def learns_new_domain(self) -> bool:
        """``model.finetune: auto`` from pretrained weights chose to train all layers: the probe says the pretrained
        features do not separate these classes well."""
        return self.auto and self.pretrained and self.finetune != "head"

    def budget_reasons(self) -> dict[str, str]:
        """Why this many epochs and this backbone rate, in words (the log, the run's tags): for those that were
        auto."""
        t, why = self.train, {}
        for key in AUTO_KEYS:
            if key not in self.auto_budget or (key == "blend" and not self.learns_new_domain):
                continue  # blend auto otherwise scores its candidates on val, and says so then
            because = ("all layers learn images unlike the pretrained ones (model.finetune auto chose "
                       f"{self.finetune})" if self.learns_new_domain else
                       f"model.finetune {self.finetune}" + (" (auto)" if self.auto else ""))
            if key == "backbone_lr_mult" and not any(self.discriminative(p) for p in self.phases):
                because += ", where no backbone trains at its own rate: unused"
            if key == "select":
                because = ("the last epoch: " if t.select == "last" else "the lowest val loss: ") + because
            if key == "ensemble":
                because = (f"{self.members} all-layer runs, logits averaged: " if self.members > 1 else
                           "one model: ") + because
            if key == "refit":
                because = ("the ensemble's members after the first train on train + val, the first keeps val to "
                           "validate on: " if self.members_see_val else "val held out: ") + because
            value = getattr(t, key)
            shown = str(value).lower() if isinstance(value, bool | str) else format(value, "g")
            why[key] = f"{shown}: {because}; train.{key} auto"
        return why

    def finetune_reason(self) -> str:
        """Why this mode, in words (the log, the run's tag)."""
        if not self.auto:
            return f"{self.finetune}: model.finetune {self.finetune}"
        if not self.pretrained:
            return "full: random init, every layer has to learn (model.finetune auto)"
        if self.probe_val is None or math.isnan(self.probe_val):
            return f"{self.finetune}: no val split to judge the linear probe on (model.finetune auto)"
        verdict = f"at least {AUTO_HEAD:g}: the pretrained features already separate the classes" \
            if self.finetune == "head" else f"below {AUTO_HEAD:g}: the backbone has to learn"
        return (f"{self.finetune}: the linear probe on the pretrained features scores {self.probe_val:.4f} on val "
                f"({verdict}; model.finetune auto)")

    @property
    def freeze_bn(self) -> bool:
        """``train.freeze_bn``: auto = kept with pretrained weights when the train images are like those the weights
        were trained on (``bn_shift`` below ``BN_SHIFT``), re-estimated when they are not. Statistics re-estimated
        from a few hundred augmented photos like ImageNet's are noisier than the pretrained ones and shift the
        features the head was fit on (real photos of another source: staged 0.967 -> 0.985, full 0.967 -> 0.982
        with them kept); satellite tiles and X-rays are far from them, and kept statistics misnormalise every
        layer. Random-init statistics mean nothing and must be learnt."""
        setting = self.train.freeze_bn
        if setting != "auto":
            return bool(setting)
        return self.pretrained and (self.bn_shift is None or self.bn_shift < BN_SHIFT)

    def batchnorm_reason(self) -> str:
        """Why BatchNorm statistics are kept or updated, in words (the log, the run's tag)."""
        verdict = "kept" if self.freeze_bn else "updated"
        if self.train.freeze_bn != "auto":
            return f"{verdict}: train.freeze_bn {str(self.train.freeze_bn).lower()}"
        if not self.pretrained:
            return f"{verdict}: random init (train.freeze_bn auto)"
        if self.bn_shift is None:
            return f"{verdict}: pretrained weights (train.freeze_bn auto)"
        side = f"below {BN_SHIFT:g}: like the images the weights were trained on" if self.freeze_bn else \
            f"at least {BN_SHIFT:g}: unlike the images the weights were trained on"
        return (f"{verdict}: the train images sit {self.bn_shift:.2f} from the pretrained statistics (mean shift in "
                f"standard deviations, {side}; train.freeze_bn auto)")

    @property
    def members_see_val(self) -> bool:
        """``train.refit: members`` with members to train: the ensemble's members after the first train on train +
        val (``trains_on_val``)."""
        return self.train.refit == "members" and self.members > 1

    def trains_on_val(self, phase: Phase) -> bool:
        """``phase`` trains on train + val and validates on nothing: an ensemble member after the first, with
        ``train.refit: members``. The first member's val curve is then the run's held-out one."""
        return phase.member > 1 and self.members_see_val

    @property
    def measures_bn(self) -> bool:
        """Whether the BatchNorm decision needs ``bn_shift``: auto, pretrained, and all layers train at some point."""
        return self.train.freeze_bn == "auto" and self.pretrained and any(not p.frozen for p in self.phases)

    @property
    def blends(self) -> bool:
        """``train.blend`` applies: below 1, and from pretrained weights. Both ends then share the pretrained
        backbone; from random init the frozen phase's backbone is noise, and averaging towards it would undo
        training."""
        return (self.train.blend == "auto" or self.train.blend < 1) and self.pretrained

    def discriminative(self, phase: Phase) -> bool:
        """All layers from pretrained weights or after a frozen phase: the backbone holds what was learnt, so it
        trains at ``lr x backbone_lr_mult``; ``full`` from random init trains everything at ``lr``."""
        return not phase.frozen and (self.pretrained or self.phases[0].frozen)

    def sweep_phase(self) -> Phase:
        """The phase a learning-rate range test sweeps: the first all-layer one (``full``, ``staged``), else the
        head's (``head``)."""
        return next((p for p in self.phases if not p.frozen), self.phases[0])

    def prepare(self, model: Classifier, phase: Phase) -> None:
        """Freeze what ``phase`` leaves alone and set how BatchNorm behaves; the model is built unfrozen."""
        model.set_frozen(phase.frozen)
        model.freeze_bn = self.freeze_bn

    def trained_module(self, model: Classifier, phase: Phase) -> nn.Module:
        """What the optimizer updates: the head alone in a frozen phase (it trains on cached features)."""
        return model.head if phase.frozen else model

    def param_groups(self, model: Classifier, phase: Phase) -> list[dict]:
        """The optimizer's groups with their rates: the head at ``lr`` first (the group the logs report), the
        backbone at ``lr x backbone_lr_mult`` when ``discriminative``; frozen parameters are left out."""
        t = self.train
        if phase.frozen:
            return [{"params": list(model.head.parameters()), "lr": t.lr}]
        if not self.discriminative(phase):
            return [{"params": list(model.parameters()), "lr": t.lr}]
        head = model.head_parameter_names()
        named = list(model.named_parameters())
        return [{"params": [p for n, p in named if n in head], "lr": t.lr},
                {"params": [p for n, p in named if n not in head], "lr": t.lr * t.backbone_lr_mult}]

    def optimizer(self, model: Classifier, phase: Phase) -> torch.optim.Optimizer:
        t = self.train
        return build_optimizer(t.optimizer, self.param_groups(model, phase), t.lr, t.momentum, t.weight_decay,
                               t.nesterov)

    def scheduler(self, optimizer: torch.optim.Optimizer, phase: Phase,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
        t = self.train
        return build_scheduler(t.schedule, optimizer, phase.epochs, steps_per_epoch, t.warmup_epochs)

    def criterion(self, labels: np.ndarray, num_classes: int, device: torch.device | None = None) -> nn.Module:
        """Cross-entropy with ``train.label_smoothing``; ``train.class_weights: auto`` weighs each class by its
        inverse frequency in ``labels`` (the train split's), so a rare class counts as much as a common one, once
        the classes are more than ``WEIGH_FROM`` apart."""
        weight = None
        if weighs(self.train.class_weights, labels, num_classes):
            weight = torch.tensor(class_weights(labels, num_classes), dtype=torch.float32, device=device)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=self.train.label_smoothing)

    def augment(self, phase: Phase) -> Augment | None:
        """On-device augmentation for all-layer phases; a frozen phase trains on features computed once."""
        return None if phase.frozen else Augment.from_params(self.train.augment)

    def mix(self, phase: Phase, classes: int) -> Mix | None:
        """mixup / cutmix for all-layer phases (``train.augment.mixup``, ``cutmix``)."""
        return None if phase.frozen else Mix.from_params(self.train.augment, classes)

    def head_from_probe(self, fresh: bool) -> bool:
        """A frozen phase starts its head at the linear probe's solution (``train.head_init: probe``) unless it
        resumes: then the checkpoint's head stands."""
        return self.train.head_init == "probe" and fresh

    def keeps_start(self, phase: Phase) -> bool:
        """The weights the first all-layer phase starts from are kept: to blend back toward (after a frozen one),
        and for the further ensemble members to start from."""
        return not phase.frozen and phase.member == 1 and (self.blends_back or self.members > 1)

    @property
    def blends_back(self) -> bool:
        """``train.blend`` applies: staged (a frozen phase, then all layers) and ``blends``."""
        return self.blends and self.phases[0].frozen and len(self.phases) > 1

    @staticmethod
    def restore(payload: dict, phase: Phase, optimizer: torch.optim.Optimizer, scheduler, scaler) -> None:
        """The optimizer, schedule and grad scaler of ``phase`` from a checkpoint made inside it (a phase that
        ended at the checkpoint starts its successor fresh)."""
        if not phase.first <= payload["epoch"] < phase.last:
            return
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])

    def for_refit(self, epochs: int, blend: float | None = None) -> Recipe:
        """The recipe again for ``epochs`` on train + val with nothing to select on: ``staged`` that kept a frozen
        epoch becomes ``head``; the blend weight is the one the selection run used (``train.blend: auto`` chose it
        on val, which a refit no longer has)."""
        finetune = "head" if self.finetune == "staged" and epochs <= self.train.head_epochs else self.finetune
        kept = self.train.blend if blend is None else blend
        if finetune != "head" and self.members > 1:  # the members' epochs are counted on: each trains the budget
            epochs = self.train.epochs
        return dataclasses.replace(self, finetune=finetune, train=dataclasses.replace(
            self.train, epochs=epochs, select="last", refit=False, blend=kept))

    def describe(self) -> list[str]:
        """What each phase does, in words: the log's first line, and the docs' table of modes (a test holds the
        two together)."""
        t, a = self.train, self.train.augment
        bn = "BatchNorm statistics kept" if self.freeze_bn else "BatchNorm statistics updated"
        if self.measures_bn and self.bn_shift is None:  # before the data is looked at
            bn = "BatchNorm statistics kept or updated as the train images decide (freeze_bn auto)"
        words = []
        for phase in self.phases:
            epochs = f"{phase.epochs} epoch{'s' if phase.epochs > 1 else ''}"
            if phase.member > 1:
                data = ", on train + val (nothing held out)" if self.trains_on_val(phase) else ""
                words.append(f"{epochs}: all layers again from where they started, as before{data} (ensemble "
                             f"member {phase.member} of {self.members}; the model averages the members' logits)")
                continue
            if phase.frozen:
                start = "from the linear probe" if t.head_init == "probe" else "from random"
                words.append(f"{epochs}: head only {start}, lr {t.lr:g}, on cached features (no augmentation)")
                continue
            lr = f"head lr {t.lr:g}, backbone lr {t.lr * t.backbone_lr_mult:g}" if self.discriminative(phase) \
                else f"lr {t.lr:g}"
            crop = f"crops of {a.scale_min:g}-{a.scale_max:g} of the area, flips {a.flip:g}" if a.enabled \
                else "no augmentation"
            extras = [f"vertical flips {a.vflip:g}" if a.vflip else "", "quarter turns" if a.rot90 else "",
                      f"{a.policy} policy" if a.policy != "none" else "", f"mixup {a.mixup:g}" if a.mixup else "",
                      f"cutmix {a.cutmix:g}" if a.cutmix else ""]
            crop += "".join(f", {e}" for e in extras if e)
            blend = "" if not (self.blends_back and phase.member == 1) else \
                "; kept: the best of these epochs blended with the weights they started from, the weight of " \
                f"{', '.join(f'{b:g}' for b in BLENDS)} with the lowest val loss" if t.blend == "auto" else \
                f"; kept: {t.blend:g} x the best of these epochs + {1 - t.blend:g} x the weights they started from"
            words.append(f"{epochs}: all layers, {lr}, {bn}, {crop}{blend}")
        return words


def blend_weights(model: nn.Module, start: dict[str, torch.Tensor], blend: float) -> None:
    """The model's weights become ``blend`` x its own + (1 - blend) x ``start`` (WiSE-FT, Wortsman et al. 2022: a
    weight-space ensemble of the fine-tuned model and the one it started from, which both begin from the same
    pretrained weights, keeps more of what transfers to photos of another source). Integer buffers (BatchNorm's
    counters) stay the model's."""
    def started(k: str) -> torch.Tensor:  # an ensemble's members (members.<i>.*) started where its backbone did
        return start[k if k in start else "backbone." + k.split(".", 2)[2]]

    mixed = {k: (blend * v + (1 - blend) * started(k).to(v.device, v.dtype)) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(mixed)
