"""One stage of the full-scale GPU run (``benchmarks/gpu_session.sh`` runs them all under time limits).

Stages, each a separate process so that a time limit can stop one without losing the others
(every stage writes its results as it goes):

* ``train-noise``: LeNet with Gaussian noise sigma = 0.25 on the 60,000 official MNIST training
  digits (54,000 train / 6,000 stratified validation), Adam + cosine schedule; ``--training
  consistency`` or ``smoothadv`` and ``--sigma`` train the other noise models (the issue's
  consistency and SmoothAdv targets), each into its own files (``consistency_0.5_state.pt``).
  ``--recipe paper`` trains as Jeong & Shin 2020's code does instead (``..._paper_state.pt``):
  all 60,000 digits, SGD (lr 0.01, momentum 0.9, weight decay 1e-4), the rate divided by 10 every
  30 epochs, 90 epochs, 128 images a step.
* ``certify``: Certification of all 10,000 official test images at n0 = 100, n = 100,000,
  alpha = 0.001 (Cohen et al. 2019's setting), resumable TSV.
* ``train-robust``: TRADES (or PGD-AT) LeNet at L-inf eps = 0.3, best checkpoint by robust
  validation accuracy.
* ``attack``: PGD-40 and our AutoAttack (APGD-CE, APGD-T, Square 5,000) at L-inf eps = 0.3 on all
  10,000 test images.
* ``smoothed-attack``: SmoothAdv's attack on the smoothed noise model next to its certificates.

Usage (``--tiny`` runs every stage at a toy size on the CPU, to check the script)::

    python benchmarks/gpu_session.py STAGE --out DIR [--data data] [--tiny]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import Certification, PerturbedAccuracy, SmoothedAttack
from datamodules import MNISTDataModule
from lightning_modules import AdversarialClassifier, NoiseAugmentedClassifier
from lightning_modules.backbones import LeNet
from robust.attacks import AttackSpec
from robust.certificates import atomic_write, read_tsv
from robust.checks import SettingError, check_int, check_real
from robust.cpu_memory import retain_freed_memory


class FastMNIST(LightningDataModule):
    """The MNIST data module's splits as in-memory tensors (the same pixels: uint8 / 255)."""

    def __init__(
        self, data_dir: str, batch_size: int, tiny: bool, *, train_on_all: bool = False
    ) -> None:
        super().__init__()
        self.source = MNISTDataModule(data_dir=data_dir, download=False, batch_size=batch_size)
        self.batch_size, self.tiny, self.train_on_all = batch_size, tiny, train_on_all

    def setup(self, stage: str | None = None) -> None:
        self.source.setup(stage)
        self.train_set = self._tensors(self.source.train_set, 2000 if self.tiny else None)
        self.val_set = self._tensors(self.source.val_set, 500 if self.tiny else None)
        if self.train_on_all:  # all 60,000 (the validation metrics then are of training images)
            together = zip(self.train_set.tensors, self.val_set.tensors, strict=True)
            self.train_set = TensorDataset(*(torch.cat(pair) for pair in together))
        self.test_set = self.source.test_set

    @staticmethod
    def _tensors(subset, limit):
        base, indices = subset.dataset, torch.as_tensor(subset.indices)
        if limit:
            indices = indices[:limit]
        images = base.data[indices].unsqueeze(1).float().div(255)
        return TensorDataset(images, torch.as_tensor(base.targets)[indices])

    def identity(self) -> dict:
        return self.source.identity() if hasattr(self.source, "identity") else {}

    def train_dataloader(self):
        # the batches of shuffle=True, each fetched by one indexing of the tensors, not per image
        batches = BatchSampler(RandomSampler(self.train_set), self.batch_size, drop_last=True)
        return DataLoader(self.train_set, sampler=batches, batch_size=None)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=1000)

    def test_dataloader(self):
        # up to 4 workers decode the images, leaving a core to the model (1 on a 2-core machine)
        workers = min(4, len(os.sched_getaffinity(0)) - 1)
        return DataLoader(self.test_set, batch_size=1000, num_workers=workers)


EPOCHS = {"value": 30}


def cosine(optimizer):
    """Cosine learning-rate schedule over the planned epochs (module level: checkpoints pickle it)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS["value"])


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def paper_sgd(params):
    """Jeong & Shin 2020's optimizer (code/train_utils.py): SGD, momentum 0.9, weight decay 1e-4."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


def paper_steps(optimizer):
    """Their schedule: the learning rate divided by 10 every 30 epochs."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)


# recipe: (optimizer, schedule, training batch, train on all 60,000 digits)
RECIPES = {"adam-cosine": (adam, cosine, 256, False), "paper": (paper_sgd, paper_steps, 128, True)}


class KeepBest(Callback):
    """Save the module's state dict whenever ``monitor`` improves (loads with weights_only=True)."""

    def __init__(self, path: Path, monitor: str) -> None:
        self.path, self.monitor, self.best, self.epoch = path, monitor, -1.0, -1

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or float(value) <= self.best:
            return
        self.best, self.epoch = float(value), trainer.current_epoch
        torch.save(pl_module.state_dict(), self.path)


def trainer(out: Path, name: str, accelerator: str, **kwargs) -> Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return Trainer(
        accelerator=accelerator,
        devices=1,
        logger=TensorBoardLogger(str(out / "tb"), name=name, version="0"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def record(out: Path, stage: str, values: dict) -> None:
    """Add one stage's results to ``results.json`` (locked: stages may run at once).

    A stage run again (a resumed certification) is added as ``"<stage> (run k)"``, so the timing
    of every attempt is kept.
    """
    path = out / "results.json"
    with open(out / "results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {}
        key, attempt = stage, 1
        while key in results:
            attempt += 1
            key = f"{stage} (run {attempt})"
        results[key] = values
        atomic_write(path, json.dumps(results, indent=2, default=str))  # never half a file
    print(f"[{key}] {json.dumps(values, default=str)}", flush=True)


# Jeong & Shin 2020's MNIST lambda by sigma (their EXPERIMENTS.MD); the runs in
# docs/gpu_h200_consistency*/ used 5.0 at sigma 0.25 as well (--consistency-weight 5)
CONSISTENCY_WEIGHT = {0.25: 10.0, 0.5: 5.0, 1.0: 5.0}

NOISE_TRAININGS = {
    "gaussian": {},
    # Jeong & Shin 2020's MNIST setting (configs/mnist/consistency.yaml); lambda by sigma
    "consistency": {"num_noise_samples": 2, "entropy_weight": 0.5},
    # Salman et al. 2019 (configs/mnist/smoothadv.yaml)
    "smoothadv": {
        "num_noise_samples": 2,
        "smoothadv_eps": 0.5,
        "smoothadv_steps": 2,
        "smoothadv_warmup_epochs": 2,
    },
    # Jeong & Shin 2020's SmoothAdv baseline on MNIST (EXPERIMENTS.MD: --epsilon 255 --num-steps 10
    # --warmup 10 --num-noise-vec 4; their code divides eps by 256); eps warms up over the first
    # ninth of the epochs (their 10 of 90). Five runs of theirs certify ACR 0.9315-0.9327 at 0.25.
    "smoothadv-jeong": {
        "num_noise_samples": 4,
        "smoothadv_eps": 255 / 256,
        "smoothadv_steps": 10,
    },
}


def noise_name(args) -> str:
    """File stem of a noise model: ``noise`` (Gaussian, sigma 0.25), else ``consistency_0.5`` etc.

    ``--recipe paper`` adds ``_paper`` (``consistency_0.25_paper``);
    ``--smoothadv-steps`` adds ``_steps<N>`` (``smoothadv-jeong_0.25_steps2``).
    """
    recipe = "_paper" if args.recipe == "paper" else ""
    if args.smoothadv_steps is not None:
        recipe += f"_steps{args.smoothadv_steps}"
    if args.training == "gaussian" and args.sigma == 0.25 and not recipe:
        return "noise"
    return f"{args.training}_{args.sigma:g}{recipe}"


def fail(message: str) -> NoReturn:
    """Refuse a bad setting with one ``error:`` line and exit status 2 (argparse's)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def noise_model(args) -> NoiseAugmentedClassifier:
    optimizer, schedule = RECIPES[args.recipe][:2]
    extra = dict(NOISE_TRAININGS[args.training])
    if args.training == "consistency":
        weight = args.consistency_weight
        if weight is None:
            weight = CONSISTENCY_WEIGHT.get(args.sigma)
        if weight is None:
            fail(f"--consistency-weight is needed at sigma {args.sigma:g}")
        extra["consistency_weight"] = weight
    if args.training == "smoothadv-jeong":
        extra["smoothadv_warmup_epochs"] = max(1, round(EPOCHS["value"] / 9))
    if args.smoothadv_steps is not None:
        if "smoothadv_steps" not in extra:
            fail(f"--smoothadv-steps needs a SmoothAdv --training, not {args.training}")
        extra["smoothadv_steps"] = args.smoothadv_steps
    return NoiseAugmentedClassifier(
        backbone=LeNet, sigma=args.sigma, optimizer=optimizer, lr_scheduler=schedule, **extra
    )


def robust_model(method: str, epochs: int, tiny: bool) -> AdversarialClassifier:
    return AdversarialClassifier(
        backbone=LeNet,
        optimizer=adam,
        lr_scheduler=cosine,
        method=method,
        attack=AttackSpec("pgd", "inf", 0.3, steps=10),
        perturbed_fraction=1.0 if method == "at" else None,
        eps_warmup_epochs=min(2, epochs - 1),
        robust_val_images=200 if tiny else 1000,
    )


def train_noise(args) -> None:
    EPOCHS["value"] = epochs = 2 if args.tiny else args.epochs
    seed_everything(0)
    model, name = noise_model(args), noise_name(args)
    run = trainer(
        args.out, name, args.accelerator, max_epochs=epochs, max_time={"seconds": args.seconds}
    )
    start = time.perf_counter()
    batch, train_on_all = RECIPES[args.recipe][2:]
    data = FastMNIST(args.data, batch, args.tiny, train_on_all=train_on_all)
    run.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), args.out / f"{name}_state.pt")
    tested = run.test(model, datamodule=data, verbose=False)[0]
    stage = "train-noise" if name == "noise" else f"train-{name}"
    recipe = {"recipe": args.recipe, "consistency_weight": model.consistency_weight}
    if model.smoothadv_eps > 0:
        recipe.update(
            num_noise_samples=model.num_noise_samples,
            smoothadv_eps=model.smoothadv_eps,
            smoothadv_steps=model.smoothadv_steps,
            smoothadv_warmup_epochs=model.smoothadv_warmup_epochs,
        )
    record(args.out, stage, {"epochs": run.current_epoch, "train_s": seconds, **recipe, **tested})


def load_state(model: nn.Module, path: Path, writer: str) -> None:
    """Load a state dict this script saved into ``model``, checked first: the file is untrusted.

    Loaded with ``weights_only=True`` (no code runs); it must hold exactly the model's tensors,
    each of the model's shape and dtype, and finite floating-point values.

    Args:
        model: The module to load into.
        path: The state file.
        writer: The command line of the stage that writes the file, named in messages.

    Raises:
        SettingError: Naming the file, what is wrong and the stage that writes it.
    """
    remedy = f"run the stage that writes it first: {writer}"
    if not path.is_file():
        raise SettingError(f"{path} is missing; {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle fails in many ways (KeyError from its memo)
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise SettingError(f"{path} is not a state dict of tensors ({reason}); {remedy}") from None
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise SettingError(f"{path} does not hold a state dict of tensors; {remedy}")
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    foreign = [key for key in state if key not in expected]
    if missing or foreign:
        raise SettingError(
            f"{path} holds the weights of another model ({len(missing)} of the model's tensors "
            f"missing, first {missing[:2]}; {len(foreign)} foreign, first {foreign[:2]}); {remedy}"
        )
    for key, tensor in expected.items():
        stored = state[key]
        if stored.layout != torch.strided or stored.device.type != "cpu":  # sparse, meta
            raise SettingError(
                f"{path}: {key} is a {stored.layout} tensor on {stored.device.type}, not the "
                f"dense CPU tensor the stage saves; {remedy}"
            )
        if stored.shape != tensor.shape or stored.dtype != tensor.dtype:
            raise SettingError(
                f"{path}: {key} is {stored.dtype} of shape {tuple(stored.shape)}, the model's is "
                f"{tensor.dtype} of shape {tuple(tensor.shape)}; {remedy}"
            )
        if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
            raise SettingError(f"{path}: {key} holds values that are not finite; {remedy}")
    model.load_state_dict(state)


def load_noise(args) -> NoiseAugmentedClassifier:
    """The noise model of ``args`` with the weights its ``train-noise`` stage saved (checked)."""
    model = noise_model(args)
    writer = f"gpu_session.py train-noise --training {args.training} --sigma {args.sigma:g}"
    writer += f" --recipe {args.recipe}"
    if args.smoothadv_steps is not None:
        writer += f" --smoothadv-steps {args.smoothadv_steps}"
    load_state(model, args.out / f"{noise_name(args)}_state.pt", f"{writer} --out {args.out}")
    return model


CERTIFY_MODE_FLAGS = (
    *("autocast", "tf32", "cudnn_benchmark", "compile", "channels_last", "cuda_graph"),
    *("pool_first", "bias_after_pool", "fused_conv_pool", "certify_batch"),
)
"""The options of ``certify`` that say how fast it runs (its results.json entry records them)."""


def certify(args) -> None:
    model, name = load_noise(args), noise_name(args)
    suffix = f"_{args.autocast}" if args.autocast else "_tf32" if args.tf32 else ""
    part = f"_from{args.first_image}" if args.first_image else ""  # one TSV per part of a split run
    callback = Certification(
        n0=100,
        n=2000 if args.tiny else 100_000,
        alpha=0.001,
        batch_size=args.certify_batch,
        cuda_graph=bool(args.cuda_graph),  # off unless --cuda-graph (5% slower on the H200)
        max_images=20 if args.tiny else None,
        skip=1 if args.skip is None else args.skip,  # --skip 0 is refused in main
        first_image=args.first_image,
        output=str(args.out / f"certify_{name}{suffix}{part}.tsv"),
        autocast=args.autocast,
        tf32=args.tf32,
        cudnn_benchmark=args.cudnn_benchmark,
        compile=args.compile,
        channels_last=args.channels_last,
        pool_first=args.pool_first,
        bias_after_pool=args.bias_after_pool,
        fused_conv_pool=args.fused_conv_pool,
    )
    run = trainer(args.out, f"certify_{name}", args.accelerator, callbacks=[callback])
    output = Path(callback.output)
    before = {row.idx for row in read_tsv(output)[0]} if output.is_file() else set()
    start = time.perf_counter()
    interrupted = False
    try:
        run.test(model, datamodule=FastMNIST(args.data, 256, args.tiny), verbose=False)
    except (KeyboardInterrupt, SystemExit):  # a time limit's SIGINT (Lightning exits with 1)
        interrupted = True
    seconds = time.perf_counter() - start
    samples = callback.samples_this_run  # resumed rows cost nothing: not counted
    # the rows' own times leave out set-up, fingerprints, autotuning and compilation
    rows = read_tsv(output)[0] if output.is_file() else []  # stopped before its first round
    new_rows = [row for row in rows if row.idx not in before]
    row_seconds = sum(row.time for row in new_rows)
    per_image = callback.n0 + callback.n
    stage = "certify" if name == "noise" else f"certify-{name}"
    record(
        args.out,
        stage + suffix.replace("_", "-") + part.replace("_", "-"),  # a split run's part: its own
        {
            "seconds": seconds,
            "new_images": len(new_rows),
            "samples_per_s": samples / seconds,  # wall clock of the whole stage
            "samples_per_s_rows": len(new_rows) * per_image / row_seconds if row_seconds else None,
            "mode": {key: getattr(args, key) for key in CERTIFY_MODE_FLAGS},
            # what those options resolved to (a default, say pool_first with channels_last)
            "smooth_settings": smooth.settings if (smooth := callback._smooth) else None,
            "interrupted": interrupted,
            **(getattr(callback, "summary", None) or {} if not interrupted else {}),
        },
    )
    if interrupted:
        raise SystemExit(1)  # the rows so far are in the TSV; the same command resumes


def robust_state(args) -> Path:
    """The weights file of ``train-robust --method M`` (one per method: ``robust_trades_state.pt``)."""
    return args.out / f"robust_{args.method}_state.pt"


def train_robust(args) -> None:
    EPOCHS["value"] = epochs = 2 if args.tiny else args.epochs
    seed_everything(0)
    model = robust_model(args.method, epochs, args.tiny)
    keep = KeepBest(robust_state(args), "val/robust_acc")
    run = trainer(
        args.out,
        "robust",
        args.accelerator,
        max_epochs=epochs,
        max_time={"seconds": args.seconds},
        callbacks=[keep],
    )
    start = time.perf_counter()
    run.fit(model, datamodule=FastMNIST(args.data, args.batch, args.tiny))
    record(
        args.out,
        "train-robust",
        {
            "method": args.method,
            "epochs": run.current_epoch,
            "train_s": time.perf_counter() - start,
            "best_epoch": keep.epoch,
            "best_robust_val": keep.best,
        },
    )


def attack(args) -> None:
    model = robust_model(args.method, 10, args.tiny)
    writer = f"gpu_session.py train-robust --method {args.method} --out {args.out}"
    load_state(model, robust_state(args), writer)
    attacks = [AttackSpec("pgd", "inf", 0.3, steps=40), AttackSpec("autoattack", "inf", 0.3)]
    callback = PerturbedAccuracy(
        attacks,
        batch_size=args.attack_batch,
        max_images=64 if args.tiny else None,
        num_image_grid=8,
    )
    run = trainer(args.out, "attack", args.accelerator, callbacks=[callback])
    start = time.perf_counter()
    tested = run.test(model, datamodule=FastMNIST(args.data, 256, args.tiny), verbose=False)[0]
    record(
        args.out,
        f"attack-{args.method}",
        {"method": args.method, "seconds": time.perf_counter() - start, **tested},
    )


def smoothed_attack(args) -> None:
    model = load_noise(args)
    callback = SmoothedAttack(
        radii=[0.25, 0.5, 0.75],
        steps=4 if args.tiny else 20,
        num_noise_samples=4 if args.tiny else 32,
        n=500 if args.tiny else 10_000,
        alpha=0.001,
        batch_size=250,
        max_images=4 if args.tiny else 10_000 // (10 if args.skip is None else args.skip),
        skip=1 if args.tiny else 10 if args.skip is None else args.skip,
        predict_batch_size=20_000 if args.accelerator == "gpu" else 400,
    )
    run = trainer(args.out, "smoothed_attack", args.accelerator, callbacks=[callback])
    start = time.perf_counter()
    tested = run.test(model, datamodule=FastMNIST(args.data, 256, args.tiny), verbose=False)[0]
    record(
        args.out,
        f"smoothed-attack-{noise_name(args)}",
        {"model": noise_name(args), "seconds": time.perf_counter() - start, **tested},
    )


LEVERS = {
    "cl": "--channels-last",
    "pf": "--pool-first",
    "pb": "--bias-after-pool",
    "fc": "--fused-conv-pool",
    "cb": "--cudnn-benchmark",
    "compile": "--compile",
    "graph": "--cuda-graph",
}
"""``benchmarks/certify.py`` variant flags that are certify options of this script, and theirs."""


def certify_options(args) -> None:
    """Print the certify flags for ``bench.json``'s quickest mode that certifies all in time.

    The IEEE float32 classifier in whichever measured variant certifies ``--certify-images``
    images at n = 100,000 soonest (each flag of ``LEVERS`` is a speed option: the same
    classifier, up to rounding for some): the samples at its median rate plus what its first
    call cost beyond its samples (compilation, autotuning), when that is within ``--seconds``;
    else the quickest TF32 mode. Variants with other flags (another noise block, say) are not
    candidates. ``--float32-only``: the quickest IEEE float32 mode, however long it takes.
    """
    rate, overhead = bench_rates(args.out / "bench.json")
    samples = args.certify_images * 100_100
    padding = static_padding_ratio(args.out / "bench.json", getattr(args, "certify_batch", None))
    for precision, flag in (("fp32", ""), ("tf32", "--tf32")):
        candidates = [(math.inf, flag)]  # nothing measured: the eager forward
        for name, value in rate.items():
            first, *flags = name.split("+")
            if first == precision and set(flags) <= set(LEVERS) and len(set(flags)) == len(flags):
                levers = [LEVERS[f] for f in LEVERS if f in flags]  # one order for each set
                if {"compile", "graph"} & set(flags):  # padded batches: as the stage pads them
                    value *= padding
                seconds = samples / value + overhead[name] if value > 0 else math.inf
                candidates.append((seconds, " ".join([flag, *levers]).strip()))
        seconds, options = min(candidates)
        if args.float32_only or seconds <= args.seconds or precision == "tf32":
            print(options)
            return


def padded_rows(images: int, per_image: int, batch: int) -> int:
    """Rows a static-shape forward runs for ``images`` images: whole batches, the last padded.

    Examples:
        >>> padded_rows(8, 100_100, 50_000)  # 17 batches for 800,800 samples
        850000
    """
    return math.ceil(images * per_image / batch) * batch


def static_padding_ratio(path: Path, certify_batch: int | None) -> float:
    """How much faster a static-shape variant (compile, CUDA graph) certifies in the stage.

    Both pad each call's last batch, the benchmark's calls of a few images (8: 6% of the rows
    padding) more than the stage's rounds (25 images: 2%). 1.0 where the benchmark's settings
    are not on record.
    """
    from callbacks.certification import DEFAULT_BATCH_SIZE, ROUND_FORWARDS

    try:
        settings = json.loads(path.read_text())["settings"]
        images, batch = int(settings["images"]), int(settings["batch_size"])
        per_image = int(settings["n0"]) + int(settings["n"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1.0
    stage_batch = certify_batch or DEFAULT_BATCH_SIZE["cuda"]
    stage_images = math.ceil(ROUND_FORWARDS["cuda"] * stage_batch / 100_100)
    bench = padded_rows(images, per_image, batch) / (images * per_image)
    stage = padded_rows(stage_images, 100_100, stage_batch) / (stage_images * 100_100)
    return bench / stage


def bench_rates(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Median certification rate and first-call overhead (s) by variant, from its JSON (checked).

    The JSON is ``benchmarks/certify.py``'s; an overhead it did not record counts as 0.

    Raises:
        SettingError: If the file is missing, not JSON or a variant's rate is not a number >= 0.
    """
    remedy = f"write it with benchmarks/certify.py --json {path}"
    try:
        bench = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingError(f"{path} is missing; {remedy}") from None
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError included
        raise SettingError(f"{path} is not a JSON benchmark ({err}); {remedy}") from None
    variants = bench.get("variants", {}) if isinstance(bench, dict) else None
    if not isinstance(variants, dict):
        raise SettingError(f"{path} has no object of variants; {remedy}")
    rate, overhead = {}, {}
    for name, row in variants.items():
        certify = row.get("certify") if isinstance(row, dict) else None
        value = certify.get("median") if isinstance(certify, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool):
            value = None
        if value is None or not math.isfinite(value) or value < 0:
            raise SettingError(
                f"{path}: variant {name!r} has no certify median rate (a number >= 0); {remedy}"
            )
        rate[name] = float(value)
        extra = row.get("certify_first_call_overhead_s", 0.0)
        if not isinstance(extra, int | float) or isinstance(extra, bool) or not extra >= 0:
            raise SettingError(
                f"{path}: variant {name!r} has a first-call overhead that is not a number >= 0; "
                f"{remedy}"
            )
        overhead[name] = float(extra) if math.isfinite(extra) else math.inf
    return rate, overhead


def check_options(args: argparse.Namespace) -> None:
    """Refuse an option outside its allowed values before any stage starts.

    Raises:
        SettingError: Naming the option and its allowed values.
    """
    for option, minimum in (
        ("epochs", 1),
        ("seconds", 1),
        ("batch", 1),
        ("attack_batch", 1),
        ("certify_images", 1),
        ("first_image", 0),
    ):
        check_int(f"--{option.replace('_', '-')}", getattr(args, option), minimum=minimum)
    for option in ("skip", "certify_batch", "smoothadv_steps"):  # None: the stage's default
        if getattr(args, option) is not None:
            check_int(f"--{option.replace('_', '-')}", getattr(args, option), minimum=1)
    check_real("--sigma", args.sigma, low=0)
    if args.consistency_weight is not None:
        check_real("--consistency-weight", args.consistency_weight, low=0, low_inclusive=True)
    results = args.out / "results.json"
    if results.exists():
        try:
            recorded = json.loads(results.read_text())
        except (OSError, ValueError):
            recorded = None
        if not isinstance(recorded, dict):
            raise SettingError(
                f"{results} is not a JSON object of stage results; move it away so that the "
                "stages can record theirs"
            )


STAGES = {
    "train-noise": train_noise,
    "certify": certify,
    "train-robust": train_robust,
    "attack": attack,
    "smoothed-attack": smoothed_attack,
    "certify-options": certify_options,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default="data")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seconds", type=int, default=60, help="training time limit")
    parser.add_argument("--method", default="trades", choices=["at", "trades"])
    parser.add_argument("--certify-batch", type=int, default=None, help="default: the callback's")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--batch", type=int, default=256, help="training batch of train-robust")
    parser.add_argument("--attack-batch", type=int, default=2500)
    parser.add_argument("--autocast", default=None, choices=[None, "bf16"])
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="certify the TF32 classifier (faster; stated in the TSV)",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="certify with cuDNN autotuning (the same classifier up to float rounding)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="certify with torch.compile (static shapes)"
    )
    parser.add_argument(
        "--channels-last", action="store_true", default=None, help="certify in channels-last"
    )
    parser.add_argument(
        "--pool-first", action="store_true", default=None, help="certify with ReLU after pooling"
    )
    parser.add_argument(
        "--bias-after-pool", action="store_true", help="certify with biases added after pooling"
    )
    parser.add_argument(
        "--fused-conv-pool", action="store_true", help="certify with fused conv-pool kernels"
    )
    parser.add_argument(
        "--training", default="gaussian", choices=list(NOISE_TRAININGS), help="noise stages"
    )
    parser.add_argument("--sigma", type=float, default=0.25, help="noise stages")
    parser.add_argument(
        "--recipe",
        default="adam-cosine",
        choices=list(RECIPES),
        help="noise trainings: ours, or Jeong & Shin 2020's (SGD, steps, 60,000 digits)",
    )
    parser.add_argument(
        "--consistency-weight",
        type=float,
        default=None,
        help="lambda (default: Jeong & Shin's for the sigma: 10 at 0.25, 5 at 0.5 and 1.0)",
    )
    parser.add_argument(
        "--smoothadv-steps",
        type=int,
        default=None,
        help="PGD steps of a SmoothAdv training (default: the training's; named in the files)",
    )
    parser.add_argument("--certify-images", type=int, default=20_000, help="certify-options")
    parser.add_argument(
        "--float32-only",
        action="store_true",
        help="certify-options: the fastest IEEE float32 mode, however long it takes",
    )
    parser.add_argument(
        "--skip",
        type=int,
        default=None,
        help="every skip-th test image (default: all for certify, every 10th for smoothed-attack)",
    )
    parser.add_argument(
        "--first-image",
        type=int,
        default=0,
        help="certify: the first test index (split a run across machines; named in the files)",
    )
    parser.add_argument(
        "--accelerator", default="gpu", choices=["gpu", "cpu"], help="--tiny runs on the CPU"
    )
    args = parser.parse_args()
    if args.tiny:
        args.accelerator = "cpu"
    try:
        check_options(args)
    except SettingError as err:
        fail(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("highest")
    retain_freed_memory()  # CPU forward passes reuse their memory, as under the CLI
    try:
        STAGES[args.stage](args)
    except SettingError as err:  # e.g. a TSV to resume that was written with other settings
        fail(str(err))


if __name__ == "__main__":
    main()
