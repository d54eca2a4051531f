"""Lightning's overhead: one training epoch of ``Trainer.fit`` against a plain PyTorch loop.

Both run the same StandardClassifier network, the same embedded-MNIST training loader and batch
size, Adam, in one process; each runs once untimed first, then repetitions alternate their order,
and the medians are compared with the per-repeat range of the ratio.

    python benchmarks/train.py --repeats 3 --batch-size 64
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout as well

from benchmarks.options import check_device, refuse
from datamodules import EmbeddedMNISTDataModule
from lightning_modules import StandardClassifier, backbones
from robust.checks import SettingError, check_int


def lightning_epoch(module: StandardClassifier, datamodule, accelerator: str) -> float:
    trainer = Trainer(
        max_epochs=1,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    return time.perf_counter() - start


def plain_epoch(module: StandardClassifier, loader, device: torch.device) -> float:
    model = module.model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Time one epoch each way, ``--repeats`` times; print the medians and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="SmallCNN", choices=["SmallCNN", "LeNet"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    try:
        device = check_device(args.device)
        for name in ("batch_size", "repeats", "threads"):
            check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=1)
    except SettingError as err:
        refuse(err)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    datamodule = EmbeddedMNISTDataModule(batch_size=args.batch_size)
    datamodule.setup()
    template = StandardClassifier(getattr(backbones, args.backbone))
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    runs = {
        "lightning": lambda: lightning_epoch(copy.deepcopy(template), datamodule, accelerator),
        "plain": lambda: plain_epoch(
            copy.deepcopy(template), datamodule.train_dataloader(), device
        ),
    }
    for run in runs.values():  # warm-up of both: one-time costs counted for neither
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):  # the order alternates, so neither always runs first
        for name in list(runs)[:: 1 if repeat % 2 == 0 else -1]:
            times[name].append(runs[name]())
    lightning_times, plain_times = times["lightning"], times["plain"]
    lit, plain = statistics.median(lightning_times), statistics.median(plain_times)
    images = len(datamodule.train_set)
    print(f"device={device} backbone={args.backbone} batch_size={args.batch_size} images={images}")
    print(f"plain PyTorch loop : {plain:7.3f} s/epoch  {images / plain:8.0f} images/s")
    print(f"Lightning fit      : {lit:7.3f} s/epoch  {images / lit:8.0f} images/s")
    ratios = [a / b for a, b in zip(lightning_times, plain_times, strict=True)]
    print(
        f"ratio Lightning/plain time: {lit / plain:.3f} (overhead {100 * (lit / plain - 1):+.1f}%); "
        f"per repeat {min(ratios):.3f}-{max(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
