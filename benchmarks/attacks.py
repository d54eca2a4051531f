"""Speed and robust accuracy of robust.attacks against torchattacks, in one process.

Speed (the default): FGM-Linf (FGSM), FGM-L2, PGD-Linf and PGD-L2 (``--steps`` steps, random start),
APGD-CE (100 iterations) and Square (``--queries`` queries) from ``robust.attacks`` against
torchattacks' ``FGSM``, ``PGDL2(steps=1, alpha=eps)``, ``PGD``, ``PGDL2``, ``APGD`` and ``Square``
on the same model and batch. Ours runs twice, at our defaults (channels-last weights on CPUs) and
in the caller's layout (``channels_last=False``, the same arithmetic as torchattacks); the three
alternate within each repetition, in rotating order, so machine drift hits all alike. Prints the
median images/s of each and the ratios ours/torchattacks (> 1: ours faster) as the median and the
range over the repetitions, and, for the deterministic attacks, the largest difference between our
and torchattacks' adversarial batches and the share of images equal to 1e-6 (in float32 they
differ where torchattacks' cross-entropy gradient loses ``p_y - 1`` to cancellation).

Cross-check (``--crosscheck``): robust accuracy of ours and torchattacks at the same settings on
the same test images: APGD-CE (100 iterations), APGD-T (100 iterations, 9 target classes), Square
(5,000 queries, AutoAttack's unscaled schedule) and AutoAttack (ours: APGD-CE, APGD-T, Square;
torchattacks' ``MultiAttack`` of the same three at the same settings, and with ``--with-fab`` its
``AutoAttack``, which adds FAB-T and runs APGD for 10 iterations).

The model is a LeNet (``Normalize`` then ``LeNet(1, 10)``) trained for ``--epochs`` epochs on the
4,000 embedded MNIST training digits; the batch is the first ``--batch`` test digits. Without
torchattacks installed only our numbers are printed.

    python benchmarks/attacks.py                               # CPU, batch 256
    python benchmarks/attacks.py --device cuda --reps 10
    python benchmarks/attacks.py --crosscheck --images 500 --attacks apgd-ce,square
    python benchmarks/attacks.py --crosscheck --attacks square --norms 2 --seeds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout as well

import robust._attack_core as attack_core
from benchmarks.options import check_device, refuse
from datamodules import EmbeddedMNISTDataModule
from lightning_modules.backbones import LeNet, Normalize, SmallCNN
from robust.attacks import AttackSpec, apgd, apgd_t, autoattack, fgm, pgd, square
from robust.checks import SettingError, check_choice, check_int, check_real
from robust.cpu_memory import retain_freed_memory

try:
    import torchattacks
except ImportError:  # the GPU machine may not have it
    torchattacks = None


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, synchronising CUDA before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def trained_model(
    args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, Tensor, Tensor]:
    """The benchmark model (trained for ``--epochs``) and all test digits with their labels."""
    data = EmbeddedMNISTDataModule(seed=0)
    data.setup()
    torch.manual_seed(args.seed)
    backbone = LeNet(1, 10) if args.model == "lenet" else SmallCNN(1, 10)
    model = nn.Sequential(Normalize(data.mean, data.std), backbone).to(device)
    x_train, y_train = (t.to(device) for t in data.train_set.tensors)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for start in range(0, len(x_train), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[index]), y_train[index]).backward()
            optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = (t.to(device) for t in data.test_set.tensors)
    return model, x, y


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return sum(
            (model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum().item()
            for i in range(0, len(x), 500)
        ) / len(x)


def ta_norm(norm: str) -> str:
    return "Linf" if norm == "inf" else "L2"


def speed_cases(
    args: argparse.Namespace, model: nn.Module | None, x: Tensor | None, y: Tensor | None
) -> list[tuple[str, Callable[[bool | None], Tensor], Callable[[], Tensor] | None, bool]]:
    """(label, ours(channels_last), torchattacks or None, deterministic) of the speed rows.

    Nothing runs until a case is called: ``speed_cases(args, None, None, None)`` gives the labels.
    """
    e_inf, e_2, steps = args.eps_inf, args.eps_2, args.steps

    def gen() -> torch.Generator:
        assert x is not None
        return torch.Generator(device=x.device).manual_seed(0)

    # label, ours(channels_last) -> images, theirs or None, deterministic (compare images)
    cases: list[tuple[str, Callable[[bool | None], Tensor], Callable[[], Tensor] | None, bool]] = [
        (
            "FGM-Linf (FGSM)",
            lambda cl: fgm(model, x, y, e_inf, "inf", channels_last=cl),
            torchattacks and (lambda: torchattacks.FGSM(model, eps=e_inf)(x, y)),
            True,
        ),
        (
            "FGM-L2",
            lambda cl: fgm(model, x, y, e_2, "2", channels_last=cl),
            torchattacks
            and (
                lambda: torchattacks.PGDL2(model, eps=e_2, alpha=e_2, steps=1, random_start=False)(
                    x, y
                )
            ),
            True,
        ),
        (
            f"PGD{steps}-Linf",
            lambda cl: pgd(
                model, x, y, e_inf, "inf", steps=steps, generator=gen(), channels_last=cl
            ),
            torchattacks
            and (
                lambda: torchattacks.PGD(model, eps=e_inf, alpha=2.5 * e_inf / steps, steps=steps)(
                    x, y
                )
            ),
            False,
        ),
        (
            f"PGD{steps}-L2",
            lambda cl: pgd(model, x, y, e_2, "2", steps=steps, generator=gen(), channels_last=cl),
            torchattacks
            and (
                lambda: torchattacks.PGDL2(model, eps=e_2, alpha=2.5 * e_2 / steps, steps=steps)(
                    x, y
                )
            ),
            False,
        ),
        (
            "APGD-CE-Linf",
            lambda cl: apgd(model, x, y, e_inf, "inf", generator=gen(), channels_last=cl),
            torchattacks
            and (lambda: torchattacks.APGD(model, norm="Linf", eps=e_inf, steps=100, seed=0)(x, y)),
            False,
        ),
        (
            "APGD-CE-L2",
            lambda cl: apgd(model, x, y, e_2, "2", generator=gen(), channels_last=cl),
            torchattacks
            and (lambda: torchattacks.APGD(model, norm="L2", eps=e_2, steps=100, seed=0)(x, y)),
            False,
        ),
        (
            f"Square{args.queries}-Linf",
            lambda cl: square(
                model, x, y, e_inf, "inf", n_queries=args.queries, generator=gen(), channels_last=cl
            ),
            torchattacks
            and (
                lambda: torchattacks.Square(
                    model,
                    norm="Linf",
                    eps=e_inf,
                    n_queries=args.queries,
                    seed=0,
                    resc_schedule=False,
                )(x, y)
            ),
            False,
        ),
    ]
    return cases


def speed(args: argparse.Namespace, model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Images/s of ours and torchattacks on the batch, interleaved (see the module's docstring)."""
    cases = speed_cases(args, model, x, y)
    wanted = [w.strip().lower() for w in args.attacks.split(",")] if args.attacks else None
    if wanted:
        cases = [c for c in cases if any(c[0].lower().startswith(w) for w in wanted)]
    default_cl = x.device.type == "cpu"
    print(
        f"speed: ours at our defaults (channels_last={default_cl}) and in the caller's layout "
        f"(channels_last=False) vs torchattacks; {args.reps} interleaved repetitions; "
        f"clean accuracy {accuracy(model, x, y):.3f}"
    )
    head = f"{'attack':18s} {'ours img/s':>11s} {'same-layout':>12s} {'torchattacks':>13s}"
    ratios = f"{'ratio default (range)':>24s} {'ratio same-layout (range)':>26s}"
    # a faster path must do the same attack: robust accuracy of each, and (deterministic attacks)
    # the largest difference of our two paths' images from torchattacks' with the share equal
    checks = f"{'robust acc default/same/theirs':>31s} {'max|diff| default; same':>28s}"
    print(f"{head} {ratios} {checks}")
    for label, ours, theirs, deterministic in cases:
        runs: dict[str, Callable[[], object]] = {
            "default": lambda ours=ours: ours(None),
            "same": lambda ours=ours: ours(False),
        }
        if theirs is not None:
            runs["theirs"] = theirs
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        names = list(runs)
        for rep in range(args.reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(timed(runs[name], x.device))
        ips = {k: len(x) / statistics.median(v) for k, v in times.items()}
        row = f"{label:18s} {ips['default']:11.1f} {ips['same']:12.1f}"
        images = {name: fn() for name, fn in runs.items()}
        robust = "/".join(f"{accuracy(model, images[k], y):.3f}" for k in images)
        if "theirs" in times:
            ratios = {
                k: [t / o for o, t in zip(times[k], times["theirs"], strict=True)]
                for k in ("default", "same")
            }
            cells = [
                f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})" for r in ratios.values()
            ]
            diff = "-"
            if deterministic:  # largest difference; share of images equal to 1e-6
                gaps = [
                    (images[k] - images["theirs"]).flatten(1).abs().amax(1)
                    for k in ("default", "same")
                ]
                diff = "; ".join(
                    f"{gap.max().item():.1e} {(gap <= 1e-6).float().mean().item():.2f}"
                    for gap in gaps
                )
            row += f" {ips['theirs']:13.1f} {cells[0]:>24s} {cells[1]:>26s}"
            row += f" {robust:>31s} {diff:>28s}"
        else:
            row += f" {'(not installed)':>13s} {'':>24s} {'':>26s} {robust:>31s}"
        print(row, flush=True)


def cross_cases(
    args: argparse.Namespace,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: str,
    eps: float,
    seed: int,
) -> list[tuple[str, Callable[[], Tensor], Callable[[], Tensor] | None]]:
    """(label, ours, torchattacks or None) for one norm at the same settings and ``seed``."""
    q, tn = args.cross_queries, ta_norm(norm)

    def gen() -> torch.Generator:
        return torch.Generator(device=x.device).manual_seed(seed)

    def ta_apgd():
        return torchattacks.APGD(model, norm=tn, eps=eps, steps=100, seed=seed)

    def ta_apgdt():
        return torchattacks.APGDT(model, norm=tn, eps=eps, steps=100, n_classes=10, seed=seed)

    def ta_square():
        return torchattacks.Square(
            model, norm=tn, eps=eps, n_queries=q, seed=seed, resc_schedule=False
        )

    def ours_autoattack() -> Tensor:
        return autoattack(model, x, y, eps, norm, n_queries=q, generator=gen())

    have = torchattacks is not None
    cases = [
        (
            "apgd-ce",
            lambda: apgd(model, x, y, eps, norm, generator=gen()),
            have and (lambda: ta_apgd()(x, y)),
        ),
        (
            "apgd-t",
            lambda: apgd_t(model, x, y, eps, norm, generator=gen()),
            have and (lambda: ta_apgdt()(x, y)),
        ),
        (
            f"square{q}",
            lambda: square(model, x, y, eps, norm, n_queries=q, generator=gen()),
            have and (lambda: ta_square()(x, y)),
        ),
        (
            "autoattack",
            ours_autoattack,
            have and (lambda: torchattacks.MultiAttack([ta_apgd(), ta_apgdt(), ta_square()])(x, y)),
        ),
    ]
    if args.with_fab and have:
        ta_aa = torchattacks.AutoAttack(model, norm=tn, eps=eps, n_classes=10, seed=seed)
        cases.append(("autoattack vs AutoAttack", ours_autoattack, lambda: ta_aa(x, y)))
    return [(label, ours, theirs or None) for label, ours, theirs in cases]


def crosscheck(args: argparse.Namespace, model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Robust accuracy of ours and torchattacks, per seed, and the gap of their means.

    Random attacks (Square above all) vary from seed to seed, so with ``--seeds K`` each side runs
    with seeds ``--seed`` .. ``--seed + K - 1``; the gap is then given with its standard error
    (the two sides' seeds are independent), so agreement is judged against the seed-to-seed spread.
    """
    wanted = [w.strip().lower() for w in args.attacks.split(",")] if args.attacks else None
    seeds = range(args.seed, args.seed + args.seeds)
    print(
        f"cross-check on {len(x)} test digits, clean accuracy {accuracy(model, x, y):.4f}, "
        f"seeds {seeds.start}..{seeds.stop - 1}; robust accuracy (time in s):"
    )
    print(
        f"{'attack':30s} {'seed':>4s} {'ours':>8s} {'torchattacks':>13s} {'diff (pp)':>10s} "
        f"{'ours s':>8s} {'theirs s':>9s}"
    )
    for norm in args.norms.split(","):
        eps = args.eps_inf if norm == "inf" else args.eps_2
        labels = [c[0] for c in cross_cases(args, model, x, y, norm, eps, args.seed)]
        for i, label in enumerate(labels):
            if wanted and not any(label.startswith(w) for w in wanted):
                continue
            name = f"{label} L{norm} eps={eps:g}"
            results: dict[str, list[float]] = {"ours": [], "theirs": []}
            for seed in seeds:
                _, ours, theirs = cross_cases(args, model, x, y, norm, eps, seed)[i]
                a = b = t_ours = t_theirs = math.nan
                if args.side in ("both", "ours"):
                    start = time.perf_counter()
                    x_ours = ours()
                    t_ours = time.perf_counter() - start
                    order = math.inf if norm == "inf" else 2
                    bound = torch.linalg.vector_norm((x_ours - x).flatten(1), ord=order, dim=1)
                    assert bound.max().item() <= eps * (1 + 1e-5), "perturbation outside the ball"
                    assert 0 <= x_ours.min() and x_ours.max() <= 1, "pixels outside [0, 1]"
                    a = accuracy(model, x_ours, y)
                    results["ours"].append(a)
                if theirs is not None and args.side in ("both", "theirs"):
                    start = time.perf_counter()
                    b = accuracy(model, theirs(), y)
                    t_theirs = time.perf_counter() - start
                    results["theirs"].append(b)
                print(
                    f"{name:30s} {seed:4d} {a:8.4f} {b:13.4f} {100 * (a - b):+10.2f} "
                    f"{t_ours:8.1f} {t_theirs:9.1f}",
                    flush=True,
                )
            if len(seeds) > 1 and all(len(r) == len(seeds) for r in results.values()):
                means = {k: statistics.mean(r) for k, r in results.items()}
                se = math.sqrt(sum(statistics.variance(r) / len(r) for r in results.values()))
                print(
                    f"{name:30s} mean {means['ours']:8.4f} {means['theirs']:13.4f} "
                    f"{100 * (means['ours'] - means['theirs']):+10.2f} pp "
                    f"(standard error {100 * se:.2f} pp; seed-to-seed SD ours "
                    f"{100 * statistics.stdev(results['ours']):.2f}, torchattacks "
                    f"{100 * statistics.stdev(results['theirs']):.2f} pp)",
                    flush=True,
                )


def row_labels(args: argparse.Namespace) -> list[str]:
    """The lower-case labels of the rows a run can print (``--attacks`` selects by prefix)."""
    if args.crosscheck:
        plain = argparse.Namespace(**{**vars(args), "with_fab": False})  # builds nothing eagerly
        return [case[0] for case in cross_cases(plain, None, None, None, "inf", 0.0, 0)]  # type: ignore[arg-type]
    return [case[0].lower() for case in speed_cases(args, None, None, None)]


def attack_specs(args: argparse.Namespace) -> list[AttackSpec]:
    """The attacks of the run as ``AttackSpec``s: built (and so checked) before any training.

    Raises:
        SettingError: For a setting no attack takes.
    """
    if args.crosscheck:
        specs = []
        for norm in args.norms.split(","):
            eps = args.eps_inf if norm == "inf" else args.eps_2
            specs += [AttackSpec("apgd-ce", norm, eps), AttackSpec("apgd-t", norm, eps)]
            specs += [
                AttackSpec(method, norm, eps, n_queries=args.cross_queries)
                for method in ("square", "autoattack")
            ]
        return specs
    return [
        AttackSpec("fgm", "inf", args.eps_inf),
        AttackSpec("fgm", "2", args.eps_2),
        AttackSpec("pgd", "inf", args.eps_inf, steps=args.steps),
        AttackSpec("pgd", "2", args.eps_2, steps=args.steps),
        AttackSpec("apgd-ce", "inf", args.eps_inf),
        AttackSpec("apgd-ce", "2", args.eps_2),
        AttackSpec("square", "inf", args.eps_inf, n_queries=args.queries),
    ]


def check_args(args: argparse.Namespace) -> torch.device:
    """Refuse a bad option before the model is trained; the device to run on.

    Raises:
        SettingError: Naming the option and its allowed values.
    """
    device = check_device(args.device)
    minimums = {"epochs": 0, "batch": 1, "steps": 1, "queries": 1, "reps": 1, "warmup": 0}
    minimums |= {"images": 1, "cross_queries": 1, "seeds": 1, "seed": 0}
    for name, minimum in minimums.items():
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=minimum)
    for name, minimum in (("threads", 1), ("cpu_chunk", 0)):  # None: torch's, the module's
        if getattr(args, name) is not None:
            check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=minimum)
    for name in ("eps_inf", "eps_2"):
        check_real(f"--{name.replace('_', '-')}", getattr(args, name), low=0, low_inclusive=True)
    for norm in args.norms.split(","):
        check_choice("--norms (comma-separated)", norm, ["inf", "2"])
    labels = row_labels(args)
    for prefix in (w.strip().lower() for w in args.attacks.split(",")) if args.attacks else ():
        if not any(label.startswith(prefix) for label in labels):
            raise SettingError(
                f"--attacks takes comma-separated prefixes of the rows "
                f"{', '.join(repr(label) for label in labels)}; got {prefix!r}"
            )
    attack_specs(args)
    return device


def main(argv: list[str] | None = None) -> None:
    """Train the model, then time or cross-check the attacks (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="lenet", choices=["lenet", "smallcnn"])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of the model")
    parser.add_argument("--batch", type=int, default=256, help="speed: images per batch")
    parser.add_argument("--steps", type=int, default=40, help="speed: PGD steps")
    parser.add_argument("--queries", type=int, default=1000, help="speed: Square queries")
    parser.add_argument("--reps", type=int, default=3, help="speed: timed repetitions")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--cpu-chunk", type=int, default=None, help="images per pass on CPUs (0: whole batch)"
    )
    parser.add_argument("--eps-inf", type=float, default=0.2)
    parser.add_argument("--eps-2", type=float, default=2.0)
    parser.add_argument("--attacks", default="", help="comma-separated prefixes of the rows to run")
    parser.add_argument("--crosscheck", action="store_true", help="robust accuracy, not speed")
    parser.add_argument("--images", type=int, default=500, help="cross-check: test digits")
    parser.add_argument("--norms", default="inf,2", help="cross-check: norms")
    parser.add_argument("--cross-queries", type=int, default=5000, help="cross-check: Square")
    parser.add_argument(
        "--with-fab", action="store_true", help="cross-check: torchattacks.AutoAttack"
    )
    parser.add_argument(
        "--side", default="both", choices=["both", "ours", "theirs"], help="cross-check: run one"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--malloc",
        choices=["retain", "default"],
        default="retain",
        help="retain: robust.cpu_memory.retain_freed_memory() first, as the CLI does",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="cross-check: attack seeds per side (mean and SE)"
    )
    args = parser.parse_args(argv)
    try:
        device = check_args(args)
    except SettingError as err:
        refuse(err)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.malloc == "retain":
        retain_freed_memory()
    if args.cpu_chunk is not None:
        attack_core.CPU_CHUNK = args.cpu_chunk
    start = time.perf_counter()
    model, x, y = trained_model(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    version = torchattacks.__version__ if torchattacks is not None else "not installed"
    print(
        f"device={name} threads={torch.get_num_threads()} malloc={args.malloc} "
        f"torch={torch.__version__} "
        f"torchattacks={version} model={args.model} (trained {args.epochs} epochs in "
        f"{time.perf_counter() - start:.0f} s)"
    )
    if args.crosscheck:
        crosscheck(args, model, x[: args.images], y[: args.images])
    else:
        speed(args, model, x[: args.batch], y[: args.batch])


if __name__ == "__main__":
    main()
