"""train(params, data_dir): datasets, loaders, model, optimizer and the fit loop, wired from typed params."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from kennel.config import Params
from kennel.data.dataset import ImageArrayDataset
from kennel.data.tensors import read_classes
from kennel.engine import EpochResult, amp_name, build_optimizer, fit, resolve_amp, resolve_device
from kennel.model import Classifier, WeightsInfo, build_model

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Classifier
    history: list[EpochResult]
    weights: WeightsInfo
    device: torch.device
    amp_dtype: torch.dtype | None


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_loader(
    dataset: ImageArrayDataset, batch_size: int, num_workers: int, device: torch.device,
    shuffle: bool = False, generator: torch.Generator | None = None,
) -> DataLoader:
    # BatchNorm cannot train on a batch of one: drop a lone last sample (a different one each shuffled epoch).
    drop_last = shuffle and len(dataset) > 1 and len(dataset) % batch_size == 1
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0, drop_last=drop_last,
    )


def train(
    params: Params, data_dir: Path, on_epoch: Callable[[EpochResult], None] = lambda r: None,
    on_start: Callable[[TrainResult], None] = lambda r: None,
) -> TrainResult:
    """Fine-tune per ``params`` on ``data_dir``'s train split, validating on val after every epoch.

    ``on_start`` sees the built model, device and weights before the first epoch (to record them early).
    """
    t = params.train
    device = resolve_device(t.device)
    amp_dtype = resolve_amp(t.amp, device)
    generator = seed_everything(params.seed)
    train_set, val_set = ImageArrayDataset(data_dir, "train"), ImageArrayDataset(data_dir, "val")
    if len(train_set) == 0:
        raise ValueError(f"{data_dir}: the train split is empty")
    model, weights = build_model(params.model.arch, read_classes(data_dir), params.model.weights, params.model.finetune)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(t.optimizer, model.parameters(), t.lr, t.momentum, t.weight_decay)
    result = TrainResult(model, [], weights, device, amp_dtype)
    log.info(
        "training on %s (amp %s), %d train / %d val images, weights %s",
        device, amp_name(amp_dtype), len(train_set), len(val_set), weights.source,
    )
    on_start(result)
    result.history = fit(
        model,
        make_loader(train_set, t.batch_size, t.num_workers, device, shuffle=True, generator=generator),
        make_loader(val_set, t.batch_size, t.num_workers, device),
        optimizer, t.epochs, device, amp_dtype, on_epoch,
    )
    return result
