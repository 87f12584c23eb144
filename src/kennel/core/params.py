"""params.yaml -> frozen, typed dataclasses.

Every key is required and checked before any stage does work: an unknown key, a missing key, a wrong type or a
value out of range raises ``ConfigError`` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from kennel.core.archs import supported_archs
from kennel.core.errors import ConfigError

SYNTHETIC_RAW_DIR = "data/synthetic"  # the shipped raw_dir: a folder every clone has, so the prepare dep exists




Workers = int | Literal["auto"]

# train.epochs and train.backbone_lr_mult auto: what the run decides once it knows whether all layers have to learn
# images unlike those the weights were trained on (model.finetune auto from pretrained weights, the linear probe
# below its bar: kennel.train.recipe). Then a real budget at one rate: on satellite tiles, 4 epochs with the
# backbone at a tenth of the rate learnt nothing the head had not (0.896 against the head's 0.900 on other tiles),
# 15 at one rate 0.904; X-rays 0.942 -> 0.950 (benchmarks/RESULTS.md, "Transfer over domains"). Otherwise (a head
# on features that already separate the classes, a mode set by hand, random init) the shipped 4 epochs and a
# tenth, chosen on pet photos.
AUTO_EPOCHS = 4
AUTO_EPOCHS_ALL_LAYERS = 15
AUTO_BACKBONE_LR_MULT = 0.1
AUTO_BACKBONE_LR_MULT_ALL_LAYERS = 1.0
# train.select and train.blend auto, in the same case: the last all-layer epoch, unblended. There the val loss
# misleads: the frozen head (calibrated, started at the probe) keeps a lower val loss than the all-layer epochs
# (sharper, more often right), so the lowest-loss epoch and the lowest-loss blend fall back to the head: satellite
# tiles, other images 0.897 kept that way against 0.935 for the last epoch (benchmarks/RESULTS.md). Otherwise the
# epoch with the lowest val loss, and blend's candidates scored on val.
AUTO_SELECT, AUTO_SELECT_ALL_LAYERS, AUTO_BLEND_ALL_LAYERS = "best", "last", 1.0
# train.ensemble auto, in the same case: two all-layer runs from the frozen phase's end, their logits averaged.
# Chosen on val: every pair of such runs measured had a val loss below its members' mean, below both but once (a
# poor second member on an imbalanced cut), on satellite tiles and X-rays, and own test +0.8 points on average over
# four pipeline pairs; on other images the tiles were level, the X-rays +0.4; their average weights (a soup) fell
# to 0.916 on the tiles (benchmarks/RESULTS.md).
# Otherwise one model: a head on features that already separate the classes gains nothing from a second.
AUTO_ENSEMBLE, AUTO_ENSEMBLE_ALL_LAYERS = 1, 2
# train.refit auto, in the same case: the ensemble's further members train on train + val; the first keeps val to
# validate on (its curve, and what was decided on val before it: the probe's mode, the orientation). Once the
# budget is fixed and each member keeps its last epoch, val decides nothing further, so the second member gets a
# quarter more labelled images at no second training. Own test splits level (net -3 images of ~550 over five
# runs: tiles, X-rays, an imbalanced cut, two seeds); the other images, scored only, +0.4 and +1.0 points on the
# tiles (0.9527, 0.9530), 0 and +0.3 on X-rays, +1.0 balanced on the imbalanced cut; 778 s after resize on the
# tiles against 714 (benchmarks/RESULTS.md). Otherwise nothing trains on val.
AUTO_REFIT, AUTO_REFIT_ALL_LAYERS = False, "members"


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "folder", "kaggle", "petimages", "oxford-pets"]
    raw_dir: str
    oxford_target: Literal["binary-category", "category"]
    val_fraction: float
    test_fraction: float
    synthetic_per_class: int
    min_size: int
    max_pixels: int
    min_per_class: int
    workers: Workers

    def check(self) -> None:
        _at_least("data.min_size", self.min_size, 1)
        _at_least("data.max_pixels", self.max_pixels, 1)
        _at_least("data.min_per_class", self.min_per_class, 1)
        _workers("data.workers", self.workers)
        _in_unit_interval("data.val_fraction", self.val_fraction)
        _in_unit_interval("data.test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g}: "
                "allowed: a sum below 1, so that some images are left to train on"
            )
        _at_least("data.synthetic_per_class", self.synthetic_per_class, 4)
        if self.source != "synthetic" and Path(self.raw_dir) == Path(SYNTHETIC_RAW_DIR):
            raise ConfigError(
                f"data.raw_dir = {self.raw_dir!r} with data.source = {self.source!r}: allowed: the folder of your "
                f"images, e.g. data/raw ({SYNTHETIC_RAW_DIR} is the synthetic source's placeholder and holds none)"
            )


@dataclass(frozen=True)
class ResizeConfig:
    size: int
    mode: Literal["squash", "center_crop", "pad"]
    workers: Workers

    def check(self) -> None:
        # every supported arch downsamples 32x; below that the feature map is empty.
        _at_least("resize.size", self.size, 32)
        _workers("resize.workers", self.workers)


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a torchvision classification model in a family whose head kennel knows
    weights: str  # auto | imagenet | none | path to a state dict
    finetune: Literal["auto", "full", "head", "staged"]  # auto: head or staged, decided by the linear probe on val

    def check(self) -> None:
        if self.arch not in supported_archs():
            raise ConfigError(f"model.arch = {self.arch!r}: allowed: {', '.join(supported_archs())}")
        if not self.weights:
            raise ConfigError("model.weights = '': allowed: auto, imagenet, none or the path of a state dict file")


@dataclass(frozen=True)
class AugmentConfig:
    """Random resized crop, flips and quarter turns, applied per sample on the training device."""

    flip: float  # probability of a horizontal flip
    scale_min: float  # crop area as a fraction of the image
    scale_max: float
    ratio_min: float  # crop aspect ratio (width / height)
    ratio_max: float
    vflip: float  # probability of a vertical flip (images with no "up": overhead, microscope)
    rot90: bool  # turn each image by 0, 1, 2 or 3 quarter turns
    policy: Literal["none", "trivial", "randaugment"]  # a stronger per-image policy (torchvision.transforms.v2)
    mixup: float  # alpha of mixup's Beta(alpha, alpha) mixing weight; 0 = off
    cutmix: float  # alpha of cutmix's; 0 = off (both on: one of the two per batch)

    def check(self) -> None:
        for key, value in (("flip", self.flip), ("vflip", self.vflip)):
            if not 0 <= value <= 1:
                raise ConfigError(f"train.augment.{key} = {value!r}: allowed: a probability in [0, 1]")
        if not isinstance(self.rot90, bool):
            raise ConfigError(f"train.augment.rot90 = {self.rot90!r}: allowed: true | false")
        for key, value in (("mixup", self.mixup), ("cutmix", self.cutmix)):
            if value < 0 or not math.isfinite(value):
                raise ConfigError(f"train.augment.{key} = {value!r}: allowed: a number >= 0 (0 = off)")
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise ConfigError(
                f"train.augment.scale_min/scale_max = {self.scale_min!r}/{self.scale_max!r}: "
                "allowed: 0 < scale_min <= scale_max <= 1"
            )
        if not 0 < self.ratio_min <= self.ratio_max:
            raise ConfigError(
                f"train.augment.ratio_min/ratio_max = {self.ratio_min!r}/{self.ratio_max!r}: "
                "allowed: 0 < ratio_min <= ratio_max"
            )

    @property
    def enabled(self) -> bool:
        return (self.flip > 0 or self.vflip > 0 or self.rot90 or self.scale_min < 1 or self.ratio_min != 1
                or self.ratio_max != 1 or self.policy != "none")


@dataclass(frozen=True)
class TrainConfig:
    lr: float
    batch_size: int  # global: split across processes when train.nproc > 1
    epochs: int | Literal["auto"]  # the budget (with patience, training may stop before); auto: see AUTO_EPOCHS
    patience: int  # stop a phase once this many epochs in a row did not improve val loss; 0 = train every epoch
    optimizer: Literal["sgd", "adam", "adamw"]
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    class_weights: Literal["none", "auto"]  # auto: the loss weighs each class by its inverse train frequency
    schedule: Literal["none", "cosine", "onecycle"]
    warmup_epochs: float
    grad_clip: float  # max global gradient norm; 0 = off
    head_epochs: int  # finetune staged: epochs with the backbone frozen, before all layers train
    # all layers from pretrained weights: the backbone's lr is train.lr times this; auto: see AUTO_EPOCHS
    backbone_lr_mult: float | Literal["auto"]
    head_init: Literal["probe", "random"]  # frozen phase: start the head at the linear probe's solution or at random
    freeze_bn: Literal["auto", True, False]  # all-layer training keeps BatchNorm's running statistics as loaded
    augment: AugmentConfig
    device: Literal["auto", "cpu", "cuda", "mps"]
    amp: Literal["auto", "bf16", "fp16", "off"]
    compile: bool
    data_on_device: Literal["auto", True, False]
    num_workers: int
    deterministic: bool
    select: Literal["auto", "best", "last"]  # auto: see AUTO_SELECT
    # true: after selection, train the recipe again on train + val for the selected epochs; members: the ensemble's
    # members after the first train on train + val; auto: see AUTO_REFIT
    refit: Literal["auto", "members", True, False]
    # staged from pretrained weights: keep blend x the kept all-layer epoch's + (1 - blend) x those it started from;
    # auto: the candidate with the lowest val loss (1 when all layers learn images unlike ImageNet's: AUTO_SELECT)
    blend: float | Literal["auto"]
    # all-layer runs, each from where the all-layer training starts, kept together: the model averages their logits
    ensemble: int | Literal["auto"]
    nproc: int

    @property
    def planned_epochs(self) -> int:
        """``epochs``, or before the run decides (auto) the fewest it may train: what the checks hold against."""
        return AUTO_EPOCHS if self.epochs == "auto" else self.epochs

    def check(self) -> None:
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr = {self.lr!r}: allowed: a finite number > 0")
        _at_least("train.batch_size", self.batch_size, 1)
        if self.epochs != "auto":
            _at_least("train.epochs", self.epochs, 1)
        _at_least("train.patience", self.patience, 0)
        _at_least("train.num_workers", self.num_workers, 0)
        _at_least("train.nproc", self.nproc, 1)
        _in_unit_interval("train.momentum", self.momentum)
        _in_unit_interval("train.label_smoothing", self.label_smoothing)
        if self.ensemble != "auto":
            _at_least("train.ensemble", self.ensemble, 1)
            if self.ensemble > 1 and self.select == "best":
                raise ConfigError(f"train.ensemble = {self.ensemble}: each member keeps its last epoch: allowed "
                                  "with train.select last or auto, not best")
        if self.refit == "members" and self.ensemble == 1:
            raise ConfigError("train.refit = members: the ensemble's members after the first train on train + val: "
                              "allowed with train.ensemble auto or > 1, not 1")
        if self.blend != "auto" and not 0 <= self.blend <= 1:
            raise ConfigError(f"train.blend = {self.blend!r}: allowed: auto or a number in [0, 1] (1 = no blending)")
        for key, value in (("weight_decay", self.weight_decay), ("grad_clip", self.grad_clip),
                           ("warmup_epochs", self.warmup_epochs)):
            if value < 0 or not math.isfinite(value):
                raise ConfigError(f"train.{key} = {value!r}: allowed: a number >= 0")
        if self.warmup_epochs >= self.planned_epochs and self.schedule == "cosine":
            raise ConfigError(
                f"train.warmup_epochs = {self.warmup_epochs!r}: allowed: fewer than train.epochs "
                f"({self.planned_epochs})"
            )
        _at_least("train.head_epochs", self.head_epochs, 0)
        if self.backbone_lr_mult != "auto" and (not self.backbone_lr_mult > 0
                                                or not math.isfinite(self.backbone_lr_mult)):
            raise ConfigError(f"train.backbone_lr_mult = {self.backbone_lr_mult!r}: allowed: auto or a finite "
                              "number > 0")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("train.nesterov = true: allowed only with train.optimizer sgd and train.momentum > 0")
        if self.batch_size % self.nproc:
            raise ConfigError(
                f"train.batch_size = {self.batch_size}: allowed: a multiple of train.nproc ({self.nproc}), "
                "since each process takes an equal share"
            )
        self.augment.check()


@dataclass(frozen=True)
class EvaluateConfig:
    # flip: mean of the logits of each image and its mirror; dihedral: of its 8 turns and mirrors; auto: dihedral
    # where the images have no "up" (the probe judges), else none. Travels with the model
    tta: Literal["none", "flip", "dihedral", "auto"]
    top_losses: int  # test images in the top-losses grids, highest loss first
    calibration_bins: int  # equal-width confidence bins of the reliability diagram and the ECE

    def check(self) -> None:
        _at_least("evaluate.top_losses", self.top_losses, 1)
        _at_least("evaluate.calibration_bins", self.calibration_bins, 2)


@dataclass(frozen=True)
class ExportConfig:
    """The export stage: models/model.onnx for onnxruntime, kept only when it matches the PyTorch model."""

    quantize: Literal["none", "int8"]  # int8: static quantization calibrated on the train split
    tolerance: float  # largest difference in a class probability between PyTorch and ONNX fp32 on the test images
    max_drop: float  # int8: largest loss of test accuracy (a fraction: 0.005 is half a point)
    sample: int  # test images the two models are compared on (evenly spaced)

    def check(self) -> None:
        for key, value in (("tolerance", self.tolerance), ("max_drop", self.max_drop)):
            if not 0 <= value <= 1:  # 1: report, never refuse
                raise ConfigError(f"export.{key} = {value!r}: allowed: a number in [0, 1]")
        _at_least("export.sample", self.sample, 1)


@dataclass(frozen=True)
class AuditConfig:
    """The audit stage: near-copies of one photo, within and across splits, found from pooled backbone features."""

    duplicate_floor: float  # cosine similarity of two images' pooled features below which they are never copies
    duplicate_margin: float  # an image's copies: its neighbours above the floor before a drop this large
    hash_distance: int  # without pretrained weights: perceptual-hash bits (of 256) at or below which they are copies
    group_splits: bool  # a group of near-copies never straddles splits: its members follow one member's split
    exact_search_max: int  # images up to which neighbours are searched exactly; past it, an HNSW graph
    outlier_score: float  # outlier score (distance to the nearest class centre / that class's median) counted
    figure_pairs: int  # the most similar pairs drawn side by side in reports/audit/near_duplicates.png
    batch_size: int | Literal["auto"]  # images per forward pass while embedding; auto: the device's inference batch

    def check(self) -> None:
        if not 0 < self.duplicate_floor <= 1:
            raise ConfigError(f"audit.duplicate_floor = {self.duplicate_floor!r}: "
                              "allowed: a cosine similarity in (0, 1]")
        if not 0 <= self.duplicate_margin < 1:
            raise ConfigError(f"audit.duplicate_margin = {self.duplicate_margin!r}: allowed: a number in [0, 1)")
        if not 0 <= self.hash_distance < 256:
            raise ConfigError(f"audit.hash_distance = {self.hash_distance!r}: allowed: an integer in [0, 255]")
        if not self.outlier_score > 0:
            raise ConfigError(f"audit.outlier_score = {self.outlier_score!r}: allowed: a number > 0")
        _at_least("audit.exact_search_max", self.exact_search_max, 1)
        _at_least("audit.figure_pairs", self.figure_pairs, 1)
        if self.batch_size != "auto":
            _at_least("audit.batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str
    registered_model: str  # each run registers a version under this name; "" = no registry
    promote_if_better: bool  # move the `champion` alias to a version that beats it on test accuracy
    system_metrics: bool  # CPU, memory and GPU utilisation on the train run (MLflow's system/* metrics)

    def check(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("mlflow.experiment = '': allowed: a non-empty experiment name")


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataConfig
    resize: ResizeConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    audit: AuditConfig
    export: ExportConfig
    mlflow: MlflowConfig

    def check(self) -> None:
        _at_least("seed", self.seed, 0)
        for section in (self.data, self.resize, self.model, self.train, self.evaluate, self.audit, self.export,
                        self.mlflow):
            section.check()
        if self.model.finetune == "staged":
            t, mode, epochs = self.train, self.model.finetune, self.train.planned_epochs
            if not 1 <= t.head_epochs < epochs:
                raise ConfigError(
                    f"train.head_epochs = {t.head_epochs}: allowed with model.finetune {mode}: "
                    f"1 to train.epochs - 1 ({epochs - 1}), so that both phases train"
                )
            if t.schedule == "cosine" and t.warmup_epochs >= epochs - t.head_epochs:
                raise ConfigError(
                    f"train.warmup_epochs = {t.warmup_epochs!r}: allowed with model.finetune {mode}: fewer than "
                    f"the second phase's train.epochs - train.head_epochs ({epochs - t.head_epochs})"
                )

    @property
    def stages_fit(self) -> bool:
        """``train.epochs``, ``head_epochs`` and ``warmup_epochs`` leave room for staged's two phases: with epochs
        and finetune both auto, in the budget auto gives all layers when it chooses them (staged arises only there)."""
        t = self.train
        epochs = AUTO_EPOCHS_ALL_LAYERS if t.epochs == "auto" and self.model.finetune == "auto" else t.planned_epochs
        return 1 <= t.head_epochs < epochs and not (t.schedule == "cosine"
                                                    and t.warmup_epochs >= epochs - t.head_epochs)

    def flat(self) -> dict[str, Any]:
        """Params as ``{"train.lr": 0.001, ...}``, the names MLflow and ``dvc exp show`` use."""
        return _flatten(dataclasses.asdict(self))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises ``ConfigError`` (message starts with the file name)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return params_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def params_from_dict(raw: Any) -> Params:
    params = _build(Params, raw, prefix="")
    params.check()
    return params


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} = {raw!r}: allowed: a mapping with keys {', '.join(_names(cls))}")
    hints = typing.get_type_hints(cls)
    unknown = [key for key in raw if key not in hints]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}: allowed keys in {where}: {', '.join(_names(cls))}"
        )
    missing = [name for name in _names(cls) if name not in raw]
    if missing:
        raise ConfigError(f"missing key {prefix}{missing[0]}: add it to the params file")
    values = {name: _coerce(f"{prefix}{name}", hints[name], raw[name]) for name in _names(cls)}
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(key, option, value)
            except ConfigError as err:
                errors.append(str(err).split(": allowed: ", 1)[-1])
        raise ConfigError(f"{key} = {value!r}: allowed: {' or '.join(errors)}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value is False and "off" in choices:
            value = "off"  # YAML 1.1 (PyYAML, `dvc exp run -S`) reads an unquoted `off` as false
        # type-exact: YAML's `true` must not pass for 1, nor 1 for `true`
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"{key} = {value!r}: allowed: {' | '.join(map(_yaml_word, choices))}")
        return value
    if hint is float:
        # YAML reads 1e-3 as a string; accept ints and numeric strings, never bools.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: allowed: a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: allowed: an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: allowed: true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: allowed: a string")
        return value
    raise TypeError(f"unsupported type {hint} for {key}")  # a bug in this module, not in the params


def _yaml_word(choice: Any) -> str:
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} = {value!r}: allowed: an integer >= {low}")


def _workers(key: str, value: int | str) -> None:
    if value != "auto":
        _at_least(key, value, 1)


def _in_unit_interval(key: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{key} = {value!r}: allowed: a number in [0, 1)")
