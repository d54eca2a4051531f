"""Throughput of robust.attacks vs torchattacks on the same model and batch, in one process.

Times FGM-Linf (FGSM), FGM-L2, PGD-Linf and PGD-L2 (``--steps`` steps, random start) from
``robust.attacks`` against torchattacks' ``FGSM``, ``PGDL2(steps=1, alpha=eps)``, ``PGD`` and
``PGDL2``; ours and theirs alternate within each repetition so machine drift hits both alike.
Prints the median images/s of each and the ratio ours/torchattacks (> 1: ours faster), and the
largest difference between the two adversarial batches for the deterministic attacks.

    python benchmarks/attacks.py                      # CPU, batch 256, PGD-40
    python benchmarks/attacks.py --device cuda --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_modules.backbones import SmallCNN
from robust.attacks import fgm, pgd


def timed(fn: Callable[[], Tensor], device: torch.device) -> float:
    """Wall time of one call, synchronising CUDA before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="PGD steps")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--eps-inf", type=float, default=0.3)
    parser.add_argument("--eps-2", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torchattacks

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = SmallCNN(1, 10).to(device).eval()
    x = torch.rand(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    e_inf, e_2, steps = args.eps_inf, args.eps_2, args.steps

    cases: list[tuple[str, Callable[[], Tensor], Callable[[], Tensor], bool]] = [
        (
            "FGM-Linf (FGSM)",
            lambda: fgm(model, x, y, e_inf, "inf"),
            lambda: torchattacks.FGSM(model, eps=e_inf)(x, y),
            True,
        ),
        (
            "FGM-L2",
            lambda: fgm(model, x, y, e_2, "2"),
            lambda: torchattacks.PGDL2(model, eps=e_2, alpha=e_2, steps=1, random_start=False)(
                x, y
            ),
            True,
        ),
        (
            f"PGD{steps}-Linf",
            lambda: pgd(model, x, y, e_inf, "inf", steps=steps),
            lambda: torchattacks.PGD(model, eps=e_inf, alpha=2.5 * e_inf / steps, steps=steps)(
                x, y
            ),
            False,
        ),
        (
            f"PGD{steps}-L2",
            lambda: pgd(model, x, y, e_2, "2", steps=steps),
            lambda: torchattacks.PGDL2(model, eps=e_2, alpha=2.5 * e_2 / steps, steps=steps)(x, y),
            False,
        ),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device={name} threads={torch.get_num_threads()} batch={args.batch} steps={steps} "
        f"reps={args.reps} torch={torch.__version__} torchattacks={torchattacks.__version__}"
    )
    print(
        f"{'attack':18s} {'ours img/s':>12s} {'torchattacks':>13s} {'ratio':>7s} {'max|diff|':>10s}"
    )
    for label, ours, theirs, deterministic in cases:
        for _ in range(args.warmup):
            ours(), theirs()
        t_ours, t_theirs = [], []
        for rep in range(args.reps):
            pair = [(ours, t_ours), (theirs, t_theirs)]
            for fn, sink in pair if rep % 2 == 0 else pair[::-1]:
                sink.append(timed(fn, device))
        ips_ours = args.batch / statistics.median(t_ours)
        ips_theirs = args.batch / statistics.median(t_theirs)
        diff = f"{(ours() - theirs()).abs().max().item():10.1e}" if deterministic else f"{'-':>10s}"
        print(
            f"{label:18s} {ips_ours:12.1f} {ips_theirs:13.1f} {ips_ours / ips_theirs:7.2f} {diff}"
        )


if __name__ == "__main__":
    main()
