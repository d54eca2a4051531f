"""Exact evaluation over a dataset on any number of processes: shard without padding, gather rows.

Lightning's DistributedSampler pads the evaluation set with repeated images so every process gets
the same number of batches; metrics computed on those batches count some images twice. Exact
evaluations (the evaluation callbacks, the adversarial module's robust validation) instead walk
the dataset themselves: each process takes the selected dataset indices ``rank, rank +
world_size, ...`` (no padding, no duplicates), computes one row of numbers per image, and
:func:`gather_rows` collects the rows of all processes, sorted by dataset index. Every process
calls the collectives the same number of times, so nothing deadlocks. Each image's random parts
come from its own generator seeded by :func:`image_seed`, so the numbers depend neither on the
batch size nor on the number of processes.

Framework-free: the trainer is used through its public attributes only (``world_size``,
``strategy.all_gather``, ``test_dataloaders``/``val_dataloaders``, ``num_test_batches``/
``num_val_batches``, ``limit_test_batches``/``limit_val_batches``, ``datamodule``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "FAST_DEV_IMAGES",
    "batches",
    "evaluated_images",
    "evaluation_dataset",
    "gather_rows",
    "image_seed",
    "rounds",
    "sampler_padding",
    "shard",
]

FAST_DEV_IMAGES = 2
"""Images an exact evaluation evaluates under Lightning's ``fast_dev_run``."""


def image_seed(seed: int, key: str, index: int) -> int:
    """Seed of one image's random parts, from (seed, what is evaluated, dataset index).

    Mixed by NumPy's ``SeedSequence`` so nearby indices give unrelated streams; independent of
    the batch size, the process count and the order of the evaluations.

    Examples:
        >>> image_seed(0, "pgd40_linf_eps0.3", 7) == image_seed(0, "pgd40_linf_eps0.3", 7)
        True
        >>> image_seed(0, "pgd40_linf_eps0.3", 7) == image_seed(0, "pgd40_linf_eps0.3", 8)
        False
    """
    words = [seed, zlib.crc32(key.encode()), index]
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def _stage_loader(trainer: Any, stage: str) -> Any:
    """The running stage's first data loader ("test" or "val"), or None."""
    loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
    if isinstance(loaders, Sequence):
        return loaders[0] if loaders else None
    return loaders


def evaluation_dataset(trainer: Any, stage: str) -> Dataset:
    """The unshuffled dataset the trainer is evaluating in ``stage`` ("test" or "val").

    Taken from the running stage's first data loader (what ``trainer.test(dataloaders=...)`` or the
    data module supplied this time), else from the data module's ``test_set``/``val_set``.

    Examples:
        >>> from types import SimpleNamespace
        >>> loader = DataLoader([(torch.zeros(1), 0)])
        >>> evaluation_dataset(SimpleNamespace(test_dataloaders=loader), "test") is loader.dataset
        True
    """
    loader = _stage_loader(trainer, stage)
    if isinstance(loader, DataLoader):
        return loader.dataset
    dataset = getattr(getattr(trainer, "datamodule", None), f"{stage}_set", None)
    if dataset is None:
        raise RuntimeError(f"no {stage} dataset found: give the Trainer a {stage} data loader")
    return dataset


def evaluated_images(trainer: Any, stage: str, dataset_size: int) -> int:
    """How many of the first dataset images the trainer evaluates in ``stage``, its limit applied.

    Lightning runs whole batches: ``min(limit, len(loader))`` for a count and
    ``int(len(loader) * limit)`` for a fraction, per process, whose distributed samplers take the
    images in turn. Once the loop has its data this is Lightning's own count
    (``trainer.num_test_batches``/``num_val_batches``) times the loader's batch size over all
    processes; before (a callback's ``setup``), the same rule on the data module's batch size;
    with neither known, all of them. ``int(size * limit)`` images instead, as this once was,
    evaluated images the loop never saw. ``fast_dev_run`` is not applied here.

    Examples:
        >>> from types import SimpleNamespace
        >>> trainer = SimpleNamespace(limit_test_batches=0.5, test_dataloaders=None, world_size=1,
        ...                           num_test_batches=[], datamodule=SimpleNamespace(batch_size=4))
        >>> evaluated_images(trainer, "test", 11)  # 3 batches of 4, 4, 3: int(1.5) = 1 of them
        4
    """
    limit = trainer.limit_test_batches if stage == "test" else trainer.limit_val_batches
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return dataset_size
    batch = getattr(_stage_loader(trainer, stage), "batch_size", None)
    counts = trainer.num_test_batches if stage == "test" else trainer.num_val_batches
    world = max(int(trainer.world_size), 1)
    if batch and counts and math.isfinite(counts[0]):
        batches = int(counts[0])  # Lightning's own count for this run
    else:
        batch = batch or getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if not batch:  # unknown until the loop starts (callbacks check again then)
            return dataset_size
        length = math.ceil(math.ceil(dataset_size / world) / batch)  # batches per process
        batches = min(limit, length) if isinstance(limit, int) else int(length * limit)
    return min(dataset_size, batches * batch * world)


def sampler_padding(trainer: Any, stage: str, batch_idx: int, batch_len: int) -> Tensor | None:
    """Which samples of an evaluation batch are the distributed sampler's padding, or None.

    Lightning evaluates on N processes with ``DistributedSampler(shuffle=False)``, which repeats
    the first images until every process has ``ceil(size / N)``: process ``r``'s ``k``-th sample
    is dataset position ``r + k * N``, a repeat when that is ``>= size``. Metrics that count
    those twice (a clean accuracy through torchmetrics) differ between 1 and N processes. None
    where the loader is not of that kind (one process, a shuffled or custom sampler).

    Examples:
        >>> from types import SimpleNamespace
        >>> sampler = DistributedSampler(range(5), num_replicas=2, rank=1, shuffle=False)
        >>> loader = DataLoader(range(5), batch_size=2, sampler=sampler)
        >>> trainer = SimpleNamespace(world_size=2, test_dataloaders=loader)
        >>> list(sampler)  # positions 1, 3 and 5: 5 is a repeat of image 0
        [1, 3, 0]
        >>> sampler_padding(trainer, "test", 1, 1).tolist()
        [True]
    """
    if int(getattr(trainer, "world_size", 1)) <= 1:
        return None
    loader = _stage_loader(trainer, stage)
    sampler = getattr(loader, "sampler", None)
    batch_size = getattr(loader, "batch_size", None)
    if type(sampler) is not DistributedSampler or sampler.shuffle or sampler.drop_last:
        return None
    if not batch_size:
        return None
    size = len(sampler.dataset)  # type: ignore[arg-type]
    k = batch_idx * batch_size + torch.arange(batch_len)
    return sampler.rank + k * sampler.num_replicas >= size


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This process's share of ``indices``: every ``world_size``-th, starting at ``rank``.

    Examples:
        >>> shard([0, 1, 2, 3, 4], rank=1, world_size=2)
        [1, 3]
    """
    return list(indices[rank::world_size])


def rounds(num_items: int, batch_size: int, world_size: int) -> int:
    """Number of batches every process runs so that all ranks call collectives equally often.

    Examples:
        >>> rounds(num_items=5, batch_size=2, world_size=2)
        2
    """
    per_rank = -(-num_items // world_size)
    return -(-per_rank // batch_size)


def batches(
    dataset: Dataset, indices: Sequence[int], batch_size: int, num_rounds: int
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Yield ``num_rounds`` batches ``(indices, images, labels)``; the last ones may be empty.

    Images are stacked from ``dataset[i]`` (image, label, ...) on the CPU.

    Examples:
        >>> data = [(torch.zeros(1, 2, 2), 7), (torch.ones(1, 2, 2), 3)]
        >>> [(i, x.shape[0], y.tolist()) for i, x, y in batches(data, [1, 0], batch_size=1, num_rounds=3)]
        [([1], 1, [3]), ([0], 1, [7]), ([], 0, [])]
    """
    for r in range(num_rounds):
        chunk = list(indices[r * batch_size : (r + 1) * batch_size])
        if not chunk:
            yield [], torch.empty(0), torch.empty(0, dtype=torch.long)
            continue
        items = [dataset[i] for i in chunk]
        images = torch.stack([torch.as_tensor(item[0]) for item in items])
        labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        yield chunk, images, labels


def gather_rows(trainer: Any, rows: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """All processes' result rows, with the same value on every process, sorted by column 0.

    Args:
        trainer: The trainer (its strategy does the all-gather).
        rows: ``(k, m)`` float64 rows of this process; column 0 is the dataset index. ``k`` may
            differ between processes (including 0).
        device: Device for the collective (the module's device; NCCL needs CUDA tensors).

    Returns:
        ``(sum of k, m)`` float64 rows on the CPU, sorted by dataset index.

    Examples:
        >>> from types import SimpleNamespace
        >>> rows = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
        >>> gather_rows(SimpleNamespace(world_size=1), rows)[:, 0].tolist()
        [0.0, 3.0]
    """
    rows = rows.to(torch.float64)
    if trainer.world_size == 1:
        return rows[torch.argsort(rows[:, 0])] if len(rows) else rows
    strategy = trainer.strategy
    count = torch.tensor([rows.shape[0]], device=device)
    counts = strategy.all_gather(count).reshape(-1)
    width = rows.shape[1]
    padded = torch.zeros(int(counts.max()), width, dtype=torch.float64, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = strategy.all_gather(padded).reshape(trainer.world_size, -1, width).cpu()
    parts = [gathered[r, : int(counts[r])] for r in range(trainer.world_size)]
    merged = torch.cat(parts)
    return merged[torch.argsort(merged[:, 0])]
