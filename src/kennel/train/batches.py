"""Mini-batches: one shuffled order per epoch shared by every process, drawn from tensors already on the device
or streamed from the memory-mapped shards."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from kennel.core.device import send
from kennel.data.dataset import ImageArrayDataset
from kennel.data.shards import read_split


def batch_order(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None, rank: int = 0, world: int = 1
) -> list[torch.Tensor]:
    """Index batches for one epoch: one permutation from ``generator``, this rank's equal share of it.

    Every rank draws the same permutation from an identically seeded generator and takes every world-th index;
    the order is cut to a multiple of ``world`` so that all ranks run the same number of steps. A lone last
    sample is dropped when shuffling (BatchNorm cannot train on a batch of one).
    """
    order = epoch_order(n, batch_size, shuffle, generator, rank, world)
    return list(order.split(batch_size)) if len(order) else []  # a rank with no share has no batch at all


def epoch_order(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """``batch_order`` before it is cut into batches: this rank's indices for one epoch, in order. Unshuffled
    (evaluation), every index goes to exactly one rank and the shares may differ by one: no step to keep in line."""
    if not shuffle:
        return torch.arange(n)[rank::world]
    order = torch.randperm(n, generator=generator)[: n - n % world][rank::world]
    if shuffle and len(order) > 1 and len(order) % batch_size == 1:
        order = order[:-1]
    return order


class BatchSampler:
    """``batch_order`` as a DataLoader batch sampler, for data that streams from disk."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, generator=None, rank: int = 0, world: int = 1):
        self.args = (n, batch_size, shuffle, generator, rank, world)

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in batch_order(*self.args))

    def __len__(self) -> int:
        n, batch_size, shuffle, _, rank, world = self.args
        if not shuffle:
            return math.ceil(len(range(rank, n, world)) / batch_size)
        per_rank = (n - n % world) // world
        per_rank -= shuffle and per_rank > 1 and per_rank % batch_size == 1
        return math.ceil(per_rank / batch_size)


class Batches:
    """Mini-batches drawn from tensors already where they are used (GPU memory, or RAM for the CPU).

    airbench-style: no DataLoader, no per-sample Python, no copies; a batch is one index into the tensor.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
        self.images, self.labels = images, labels.to(images.device)
        self.sampler = BatchSampler(len(labels), batch_size, shuffle, generator, rank, world)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The epoch's whole order crosses to the device in one copy, not one blocking copy per batch.
        order = send(epoch_order(*self.sampler.args), self.images.device)
        for idx in order.split(self.sampler.args[1]) if len(order) else ():
            yield self.images[idx], self.labels[idx]


def make_loader(
    dataset: ImageArrayDataset, *, batch_size: int, num_workers: int, device: torch.device, shuffle: bool = False,
    generator: torch.Generator | None = None, rank: int = 0, world: int = 1,
) -> DataLoader:
    """Batches streamed from the memory map: pinned memory and non-blocking copies on CUDA."""
    sampler = BatchSampler(len(dataset), batch_size, shuffle, generator, rank, world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0)


def make_batches(
    data_dir: Path, split: str, *, resident: bool, batch_size: int, device: torch.device, num_workers: int = 0,
    shuffle: bool = False, generator: torch.Generator | None = None, rank: int = 0, world: int = 1,
) -> Batches | DataLoader:
    """``split``'s batches: drawn from one copy on ``device`` when ``resident``, else streamed from the shards;
    this rank's share of one shuffled order, or unshuffled its share of the split (``world`` 1: all of it)."""
    if resident:
        images, labels = read_split(data_dir, split)
        x = torch.from_numpy(np.array(images)).to(device)  # a real copy in RAM or on the GPU, not the map
        return Batches(x, torch.from_numpy(labels), batch_size, shuffle, generator, rank, world)
    return make_loader(ImageArrayDataset(data_dir, split), batch_size=batch_size, num_workers=num_workers,
                       device=device, shuffle=shuffle, generator=generator, rank=rank, world=world)
