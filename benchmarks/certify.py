"""Throughput of randomized-smoothing certification (noisy samples per second).

Compares, with one LeNet-sized model, one n and one batch size, in one process:
  (a) ours: ``robust.smoothing.Smooth.certify_batch``;
  (b) loop: a plain loop written like locuslab/smoothing's ``Smooth._sample_noise`` (per batch:
      ``batch.repeat``, ``torch.randn_like``, forward, argmax, ``.cpu().numpy()`` counts; counted
      with ``np.bincount`` instead of a per-sample Python loop, a slightly stronger baseline);
  (c) ART: ``PyTorchRandomizedSmoothing.certify``;
  (d) forward: the model's plain forward pass at that batch size on a fixed input (the ceiling).
``--bf16``, ``--channels-last`` and ``--compile`` apply to ours and to the forward ceiling alike;
the loop and ART always run the plain fp32 model. Each method runs once untimed, then
``--repeats`` times interleaved; the median rate is reported (the best in brackets).

Example: ``python benchmarks/certify.py --n 2000 --images 2 --batch-size 1000``
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lightning_modules.backbones import LeNet
from robust.smoothing import Smooth

NUM_CLASSES = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n0", type=int, default=100, help="selection samples per image")
    parser.add_argument("--n", type=int, default=2000, help="estimation samples per image")
    parser.add_argument("--images", type=int, default=2, help="images per timed run")
    parser.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward")
    parser.add_argument("--noise-block", type=int, default=None, help="Smooth's noise_block")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--bf16", action="store_true", help="autocast bfloat16 (ours, forward)")
    parser.add_argument("--channels-last", action="store_true", help="(ours, forward)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (ours, forward)")
    parser.add_argument("--skip-art", action="store_true")
    parser.add_argument("--skip-loop", action="store_true")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def locuslab_loop(
    model: nn.Module, x: torch.Tensor, num: int, batch_size: int, sigma: float
) -> np.ndarray:
    """Counts of f(x + noise) as locuslab/smoothing's ``Smooth._sample_noise`` computes them."""
    with torch.no_grad():
        counts = np.zeros(NUM_CLASSES, dtype=int)
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=NUM_CLASSES)
        return counts


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = LeNet(1, NUM_CLASSES).to(device).eval()
    fast = copy.deepcopy(base)
    if args.channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    if args.compile:
        fast = torch.compile(fast)
    autocast_dtype = torch.bfloat16 if args.bf16 else None
    images = torch.rand(args.images, 1, 28, 28, device=device)
    indices = list(range(args.images))
    per_image = args.n0 + args.n
    total = args.images * per_image

    options = {} if args.noise_block is None else {"noise_block": args.noise_block}
    smooth = Smooth(
        fast,
        NUM_CLASSES,
        args.sigma,
        batch_size=args.batch_size,
        autocast_dtype=autocast_dtype,
        channels_last=args.channels_last,
        **options,
    )

    def ours() -> None:
        smooth.certify_batch(images, indices, args.n0, args.n, args.alpha)

    def loop() -> None:
        for x in images:
            locuslab_loop(base, x, args.n0, args.batch_size, args.sigma)
            locuslab_loop(base, x, args.n, args.batch_size, args.sigma)

    fixed = torch.rand(args.batch_size, 1, 28, 28, device=device)
    if args.channels_last:
        fixed = fixed.contiguous(memory_format=torch.channels_last)
    forward_iters = max(1, round(total / args.batch_size))

    def forward() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16),
        ):
            for _ in range(forward_iters):
                fast(fixed)

    methods: dict[str, tuple[Callable[[], None], int]] = {
        "ours": (ours, total),
        "forward": (forward, forward_iters * args.batch_size),
    }
    if not args.skip_loop:
        methods["loop"] = (loop, total)
    if not args.skip_art:
        from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing

        art = PyTorchRandomizedSmoothing(
            model=base,
            loss=nn.CrossEntropyLoss(),
            input_shape=(1, 28, 28),
            nb_classes=NUM_CLASSES,
            device_type="gpu" if device.type == "cuda" else "cpu",
            sample_size=args.n0,
            scale=args.sigma,
            alpha=args.alpha,
        )
        images_np = images.cpu().numpy()

        def run_art() -> None:
            art.certify(images_np, n=args.n, batch_size=args.batch_size)

        methods["ART"] = (run_art, total)

    rates: dict[str, list[float]] = {name: [] for name in methods}
    for fn, _ in methods.values():  # warm-up (and compilation)
        fn()
    synchronize(device)
    for _ in range(args.repeats):
        for name, (fn, samples) in methods.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            rates[name].append(samples / (time.perf_counter() - start))

    flags = [f for f in ("bf16", "channels_last", "compile") if getattr(args, f)]
    print(
        f"device={device} threads={torch.get_num_threads()} batch_size={args.batch_size} "
        f"n0={args.n0} n={args.n} images={args.images} options={flags or ['fp32']}"
    )
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"  {name:8s} {median[name]:12,.0f} samples/s  (best {max(r):,.0f})")
    for other in ("loop", "ART", "forward"):
        if other in median:
            print(f"  ours/{other:8s} {median['ours'] / median[other]:.2f}x")


if __name__ == "__main__":
    main()
