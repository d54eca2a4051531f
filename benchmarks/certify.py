"""Throughput of randomized-smoothing certification (noisy samples per second), CPU or GPU.

In one process, with one model (LeNet or SmallCNN on 28x28 MNIST-sized inputs) and one batch size:

* ``certify``: ``Smooth.certify_batch`` (n0 + n samples per image over ``--images`` images) for
  each variant of ``--variants``: a precision (``fp32`` = IEEE float32, ``tf32`` = TF32 allowed in
  cuDNN/matmuls, ``bf16`` = bfloat16 autocast) plus flags ``cl`` (channels_last), ``compile``
  (``torch.compile``, static shapes), ``graph`` (CUDA graph), ``cb`` (cuDNN autotuning:
  ``torch.backends.cudnn.benchmark``), ``pf`` (ReLU after max-pooling, the default with ``cl``),
  ``pb`` (convolution biases added after their max-pools; with ``pf`` for LeNet), ``fc`` (small
  convolutions with their pool and ReLU as one Triton kernel, CUDA: fp32, tf32's IEEE
  float32 sums, bf16 with bf16 operands and output),
  ``pp`` / ``mp`` (2x2 max-pools as two elementwise maxima, the CPU default / as written),
  ``nbN`` (noise_block N instead of ``--noise-block``) and ``ntN`` (N noise threads instead of
  Smooth's default), e.g. ``bf16+compile+graph+nb10000``;
* ``forward``: the bare forward pass and argmax of the same model, variant and batch size on one
  pre-made noisy batch (the ceiling: no noise, no counting); the ratio certify/forward says how
  close certification comes to it, and certify/best is against the fastest forward of any
  variant of the same precision; ``same_logits`` says whether the variant's rewritten model
  (``pf``, ``pb``, ``pp``, eager) gave bit-identical logits to the model as written on that batch
  (layout and compile aside: ``cl`` and ``compile`` may round differently);
* ``noise``: drawing the seeded noise blocks alone (``torch.randn`` per block);
* the FLOP rate of a large matmul per precision and the model's FLOPs per sample
  (``torch.utils.flop_counter``), giving the fraction of that ceiling each variant reaches;
* peers (``--peers``, default on CPUs): a loop written like locuslab/smoothing's ``_sample_noise``
  (``batch.repeat``, ``randn_like``, forward, ``.cpu()`` counts) and ART's
  ``PyTorchRandomizedSmoothing.certify`` where ART is installed (skipped otherwise);
* ``--resnet``: seconds per image of CifarResNet18 certification at n = 100,000, extrapolated
  from a small n (default on GPUs);
* ``--sweep``: the bare forward's rate over a range of batch sizes (default on GPUs);
* ``--profile``: the forward's time per kernel (``torch.profiler``) for one variant
  (``--profile-variant``, default the first), to show where a forward pass spends its time.

Each timed thing runs once untimed (warm-up, compilation, graph capture), then ``--repeats``
times interleaved; the table reports the median and the best. A time budget (``--budget-s``)
skips what would not fit. ``--json PATH`` writes every number.

Examples::

    python benchmarks/certify.py --device cpu --images 2 --n 2000            # CPU, with peers
    python benchmarks/certify.py --device cuda --json certify_h100.json      # GPU, ~3 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .` (GPU machines)

from benchmarks.options import check_device, refuse  # noqa: E402
from robust import smoothing  # noqa: E402
from robust.bias_after_pool import bias_after_pool  # noqa: E402
from robust.checks import SettingError, check_int, check_real  # noqa: E402
from robust.cpu_memory import retain_freed_memory  # noqa: E402
from robust.fused_conv_pool import (  # noqa: E402
    autotuning_record,
    fuse_conv_pool,
    fusion_available,
)
from robust.pairwise_pool import pairwise_max_pool  # noqa: E402
from robust.pool_first import pool_before_relu  # noqa: E402
from robust.smoothing import Smooth, check_num_samples  # noqa: E402

NUM_CLASSES = 10


def load_backbones():
    """``lightning_modules/backbones.py`` alone (torch and torchvision only, no Lightning)."""
    spec = importlib.util.spec_from_file_location(
        "backbones", ROOT / "lightning_modules/backbones.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--model", choices=["lenet", "smallcnn"], default="lenet")
    parser.add_argument("--n0", type=int, default=100, help="selection samples per image")
    parser.add_argument("--n", type=int, default=None, help="estimation samples per image")
    parser.add_argument("--images", type=int, default=None, help="images per timed certify call")
    parser.add_argument("--batch-size", type=int, default=None, help="noisy samples per forward")
    parser.add_argument("--noise-block", type=int, default=smoothing.DEFAULT_NOISE_BLOCK)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="process: CPU time of this process (fairer on a shared CPU with --threads 1)",
    )
    parser.add_argument("--variants", default=None, help="comma-separated, e.g. fp32,bf16+cl")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--resnet", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--resnet-n", type=int, default=None, help="n of the ResNet timing")
    parser.add_argument(
        "--resnet-variants", default="fp32,fp32+cb,tf32+cb,bf16+cb", help="CUDA: precisions [+cb]"
    )
    parser.add_argument("--sweep-variants", default="fp32+cb,bf16+cb", help="variants of --sweep")
    parser.add_argument("--profile", action="store_true", help="kernel times of one forward")
    parser.add_argument(
        "--profile-variant", default=None, help="the variant --profile times (default: the first)"
    )
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--matmul-size", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=None, help="skip what would not fit")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument(
        "--malloc",
        choices=["retain", "default"],
        default="retain",
        help="retain: robust.cpu_memory.retain_freed_memory() first, as the CLI does; default: "
        "glibc's adaptive thresholds (the lever's effect: run both)",
    )
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    defaults = {
        "n": 100_000 if gpu else 2000,
        "images": 8 if gpu else 2,
        "batch_size": 50_000 if gpu else 1000,
        "variants": (
            "fp32,fp32+cb,tf32+cb,bf16,bf16+cb,fp32+graph+cb,fp32+compile+cb,bf16+compile+cb"
            if gpu
            else "fp32,fp32+cl,bf16+cl"
        ),
        "peers": not gpu,
        "resnet": gpu,
        "resnet_n": 5000 if gpu else 200,
        "sweep": gpu,
        "matmul_size": 8192 if gpu else 1024,
        "budget_s": 170.0 if gpu else math.inf,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse a bad option before any measurement: the device, the numbers, every variant.

    Raises:
        SettingError: Naming the option and its allowed values.
        SystemExit: For an unknown variant (:func:`parse_variant`).
    """
    check_device(args.device)
    for name in ("n0", "images", "batch_size", "noise_block", "repeats", "matmul_size"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=1)
    if args.threads is not None:
        check_int("--threads", args.threads, minimum=1)
    check_real("--sigma", args.sigma, low=0)
    check_real("--alpha", args.alpha, low=0, high=1)
    if args.budget_s != math.inf:
        check_real("--budget-s", args.budget_s, low=0, low_inclusive=True)
    blocks = {args.noise_block}
    if args.profile_variant is None:
        args.profile_variant = args.variants.split(",")[0]
    for option in ("variants", "resnet_variants", "sweep_variants", "profile_variant"):
        for name in getattr(args, option).split(","):
            block = parse_variant(name, f"--{option.replace('_', '-')}")["noise_block"]
            blocks.add(block or args.noise_block)
    for block in sorted(blocks):  # n0 and n samples fit the seeds of every variant's blocks
        check_num_samples("--n0", args.n0, block)
        check_num_samples("--n", args.n, block)
    check_num_samples("--resnet-n", args.resnet_n, smoothing.DEFAULT_NOISE_BLOCK)
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        raise SettingError(
            f"--json must be a file path in an existing folder (written at the end); got {args.json}"
        )


# ----------------------------------------------------------------------------- helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_variant(name: str, option: str = "--variants") -> dict:
    """``bf16+cl+compile+graph+nb10000`` -> Smooth options.

    Flags: nbN (noise_block N, else --noise-block), ntN (noise_threads N, else Smooth's default),
    pp / mp (2x2 max-pools as pairwise maxima / as written; else Smooth's default: pp on CPUs),
    pb (biases after max-pooling), fc (fused convolution-pool kernels).

    Raises:
        SystemExit: For an unknown variant, after one ``error:`` line naming ``option`` and the
            allowed variants (exit status 2).

    Examples:
        >>> parse_variant("bf16+graph+nb10000")["noise_block"]
        10000
        >>> parse_variant("fp32+cl+mp+nt1")["pairwise_pool"], parse_variant("fp32")["noise_threads"]
        (False, None)
    """
    precision, *flags = name.split("+")
    numbers = {
        prefix: [int(f[2:]) for f in flags if f[:2] == prefix and f[2:].isdigit()]
        for prefix in ("nb", "nt")
    }
    plain = {"cl", "compile", "graph", "cb", "pf", "pb", "fc", "pp", "mp"}
    unknown = {f for f in flags if f[:2] not in numbers} - plain
    if (
        precision not in ("fp32", "tf32", "bf16")
        or unknown
        or any(len(values) > 1 for values in numbers.values())
        or any(value < 1 for values in numbers.values() for value in values)
        or {"pp", "mp"} <= set(flags)
    ):
        refuse(
            SettingError(
                f"{option} must be comma-separated variants PRECISION[+cl][+compile][+graph][+cb]"
                "[+pf][+pb][+fc][+pp|+mp][+nbN][+ntN] with PRECISION fp32, tf32 or bf16 and N >= 1; "
                f"got {name!r}"
            )
        )
    return {
        "precision": precision,
        "autocast_dtype": torch.bfloat16 if precision == "bf16" else None,
        "tf32": precision == "tf32",
        "channels_last": "cl" in flags,
        "compile": "compile" in flags,
        "cuda_graph": "graph" in flags,
        "cudnn_benchmark": "cb" in flags,
        # ReLU after max-pooling: always with +pf, else as Smooth's default (with channels_last)
        "pool_first": "pf" in flags or "cl" in flags,
        "bias_after_pool": "pb" in flags,
        "fused_conv_pool": "fc" in flags,
        "pairwise_pool": True if "pp" in flags else False if "mp" in flags else None,
        "noise_block": numbers["nb"][0] if numbers["nb"] else None,
        "noise_threads": numbers["nt"][0] if numbers["nt"] else None,
    }


@contextlib.contextmanager
def precision_flags(
    device: torch.device, tf32: bool, cudnn_benchmark: bool = False
) -> Iterator[None]:
    """TF32 and cuDNN autotuning as a variant sets them (CUDA only; restored afterwards)."""
    if device.type != "cuda":
        yield
        return
    with smoothing._tf32(tf32), smoothing._cudnn_benchmark(cudnn_benchmark):
        yield


CLOCK = time.perf_counter


def time_interleaved(
    methods: dict[str, tuple[Callable[[], object], int]],
    device: torch.device,
    repeats: int,
    warmups: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Samples/s of each method: one untimed run each, then ``repeats`` interleaved rounds.

    ``warmups``, if given, gets each method's seconds in its untimed run (compilation, graph
    capture and autotuning included).
    """
    for name, (fn, _) in methods.items():
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if warmups is not None:
            warmups[name] = time.perf_counter() - start
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, (fn, samples) in methods.items():
            synchronize(device)
            start = CLOCK()
            fn()
            synchronize(device)
            rates[name].append(samples / (CLOCK() - start))
    return rates


def summary(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "best": max(rates), "all": rates}


def flops_per_sample(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """FLOPs of one forward pass per sample (2 per multiply-add), by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(4, *shape, device=device))
    return counter.get_total_flops() // 4


def matmul_tflops(device: torch.device, precision: str, size: int, repeats: int = 3) -> float:
    """TFLOP/s of a square matmul: fp32 (IEEE), tf32 or bf16 -- the ceiling of each precision."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    iterations = 20 if device.type == "cuda" else 3
    best = 0.0
    with precision_flags(device, precision == "tf32"):
        torch.mm(a, b)
        for _ in range(repeats):
            synchronize(device)
            start = CLOCK()  # the clock of the rates it is compared with (--clock)
            for _ in range(iterations):
                torch.mm(a, b)
            synchronize(device)
            best = max(best, 2 * size**3 * iterations / (CLOCK() - start) / 1e12)
    return best


def evaluated_model(
    model: nn.Module, options: dict, device: torch.device, pool_first: bool = True
) -> nn.Module:
    """A private copy of ``model`` as ``Smooth`` evaluates it under the variant's options.

    Its layout, ReLU after max-pooling (robust.pool_first; ``pool_first=False`` keeps the model
    as written, which shows the lever), biases after max-pooling and pairwise max-pools.
    """
    private = copy.deepcopy(model).eval().requires_grad_(False)
    if options["channels_last"]:
        private = private.to(memory_format=torch.channels_last)
    if pool_first and options["pool_first"]:
        private = pool_before_relu(private)
    if pool_first and options["fused_conv_pool"] and fusion_available(device):
        private = fuse_conv_pool(private)
    if pool_first and options["bias_after_pool"]:
        private = bias_after_pool(private)
    pairwise = options["pairwise_pool"]
    if pairwise or (pairwise is None and device.type == "cpu"):  # as Smooth evaluates f
        private = pairwise_max_pool(private)
    return private


def noisy_batch(batch: int, sample_shape: tuple, device: torch.device) -> torch.Tensor:
    """One fixed batch of noisy [0, 1] images (sigma 0.25), the same for every variant."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, *sample_shape, device=device, generator=generator)
    return x + 0.25 * torch.randn(x.shape, device=device, generator=generator)


def same_logits(
    model: nn.Module,
    rewritten: nn.Module,
    options: dict,
    batch: int,
    sample_shape: tuple,
    device: torch.device,
) -> dict:
    """Whether ``rewritten`` (what ``Smooth`` evaluates, eager) gives ``model``'s logits exactly.

    Both run in the variant's precision, TF32 and cuDNN settings; a channels-last variant is
    compared with the written model in channels-last too, so only the rewrites are tested.
    """
    written = copy.deepcopy(model).eval().requires_grad_(False)
    if options["channels_last"]:
        written = written.to(memory_format=torch.channels_last)
    x = noisy_batch(batch, sample_shape, device)
    dtype = options["autocast_dtype"]
    flags = (device, options["tf32"], options["cudnn_benchmark"])
    with (
        torch.inference_mode(),
        precision_flags(*flags),
        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        expected, got = written(x).float(), rewritten(x).float()
    return {
        "same_logits": bool(torch.equal(expected, got)),
        "max_logit_difference": float((expected - got).abs().max()),
        "same_predictions": float((expected.argmax(1) == got.argmax(1)).float().mean()),
    }


def bare_forward(
    model: nn.Module,
    options: dict,
    batch: int,
    sample_shape: tuple,
    device: torch.device,
    pool_first: bool = True,
) -> Callable[[], torch.Tensor]:
    """f(x).argmax on one pre-made noisy batch, with the variant's layout/precision/compile/graph.

    f is :func:`evaluated_model`: with ``pool_first=False``, the model as written.
    """
    private = evaluated_model(model, options, device, pool_first)
    x = noisy_batch(batch, sample_shape, device)
    dtype = options["autocast_dtype"]

    def classify(inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return private(inputs).argmax(1)

    flags = (device, options["tf32"], options["cudnn_benchmark"])
    function = classify
    if options["compile"]:
        # one eager call first, as Smooth does: the fused kernel's first-call check, outside the
        # trace (inside, it splits the compiled forward for good)
        with torch.inference_mode(), precision_flags(*flags):
            classify(x)
        function = torch.compile(classify, dynamic=False)
    if options["cuda_graph"] and device.type == "cuda":
        with torch.inference_mode(), precision_flags(*flags):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    function(x)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = function(x)

        def run() -> torch.Tensor:
            graph.replay()
            return out

        return run

    def run_eager() -> torch.Tensor:
        with torch.inference_mode(), precision_flags(*flags):
            return function(x)

    return run_eager


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


# ----------------------------------------------------------------------------- measurements


class Bench:
    """Everything measured in one process, with its time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.started = time.perf_counter()
        self.results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
        self.skipped: list[str] = []
        self.reference: list | None = None  # the plain fp32 certificates (:meth:`agreement`)
        backbones = load_backbones()
        self.backbones = backbones
        torch.manual_seed(0)
        model_class = backbones.LeNet if args.model == "lenet" else backbones.SmallCNN
        self.model = model_class(1, NUM_CLASSES).to(self.device).eval()
        self.shape = (1, 28, 28)
        generator = torch.Generator(device=self.device).manual_seed(1)
        self.images = torch.rand(args.images, *self.shape, device=self.device, generator=generator)
        self.indices = list(range(args.images))
        self.total = args.images * (args.n0 + args.n)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def guarded(self, name: str, fn: Callable[[], object], need_s: float = 5.0) -> object:
        """Run one measurement unless the budget is spent; record an error instead of dying."""
        if self.left() < need_s:
            self.skipped.append(f"{name} (time budget)")
            return None
        try:
            return fn()
        except Exception as err:  # one failing variant must not lose the others' numbers
            traceback.print_exc()
            self.results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
            return None

    def environment(self) -> None:
        info = {
            "torch": torch.__version__,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "model": self.args.model,
        }
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
            info["cudnn_allow_tf32_default"] = torch.backends.cudnn.allow_tf32
            info["triton"] = importlib.util.find_spec("triton") and version("triton")
        self.results["environment"] = info
        self.results["flops_per_sample"] = flops_per_sample(self.model, self.shape, self.device)

    def matmul(self) -> None:
        precisions = ["fp32", "tf32", "bf16"] if self.device.type == "cuda" else ["fp32", "bf16"]
        self.results["matmul_tflops"] = {
            p: matmul_tflops(self.device, p, self.args.matmul_size) for p in precisions
        }

    def variant(self, name: str) -> None:
        args, options = self.args, parse_variant(name)
        smooth_options = {k: options[k] for k in ("autocast_dtype", "channels_last", "compile")}
        smooth = Smooth(
            self.model,
            NUM_CLASSES,
            args.sigma,
            batch_size=args.batch_size,
            noise_block=options["noise_block"] or args.noise_block,
            cuda_graph=options["cuda_graph"],
            tf32=options["tf32"],
            cudnn_benchmark=options["cudnn_benchmark"],
            pool_first=options["pool_first"],
            bias_after_pool=options["bias_after_pool"],
            fused_conv_pool=options["fused_conv_pool"],
            pairwise_pool=options["pairwise_pool"],
            noise_threads=options["noise_threads"],
            device=self.device,
            **smooth_options,
        )
        shape, device = self.shape, self.device
        forward = bare_forward(self.model, options, args.batch_size, shape, device)
        as_written = bare_forward(self.model, options, args.batch_size, shape, device, False)
        iterations = max(1, round(self.total / args.batch_size))

        def certify() -> None:
            smooth.certify_batch(self.images, self.indices, args.n0, args.n, args.alpha)

        def repeat(function: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def forwards() -> None:
                for _ in range(iterations):
                    function()

            return forwards

        samples = iterations * args.batch_size
        warmups: dict[str, float] = {}
        rates = time_interleaved(
            {
                "certify": (certify, self.total),
                "forward": (repeat(forward), samples),
                "forward_relu_first": (repeat(as_written), samples),
            },
            self.device,
            args.repeats,
            warmups,
        )
        # what the first call costs beyond its samples (compilation, capture, autotuning): a
        # certification of all test images pays it once
        steady = self.total / statistics.median(rates["certify"])
        certificates = smooth.certify_batch(self.images, self.indices, args.n0, args.n, args.alpha)
        same_noise = (options["noise_block"] or args.noise_block) == args.noise_block
        self.results.setdefault("variants", {})[name] = {
            "options": {k: str(v) for k, v in options.items()},
            "certify_first_call_overhead_s": max(0.0, warmups["certify"] - steady),
            **{key: summary(values) for key, values in rates.items()},
            **same_logits(
                self.model, smooth._model, options, min(args.batch_size, 4096), shape, device
            ),
            # a faster path that certifies something else must not win unnoticed
            "same_certificates": self.agreement(certificates) if same_noise else None,
        }
        if options["fused_conv_pool"] and (tuning := autotuning_record()):
            self.results["variants"][name]["fused_kernel_autotuning"] = tuning

    def agreement(self, certificates: list) -> float:
        """Fraction of images whose (top class, n_A) equal the plain IEEE float32 ``Smooth``'s.

        The reference certifies the model as written (no rewrite, no channels-last, no compile)
        with the same noise; an exact variant gives 1.0, a bf16 one the share its rounding keeps.
        """
        if self.reference is None:
            plain = Smooth(
                self.model, NUM_CLASSES, self.args.sigma, batch_size=self.args.batch_size,
                noise_block=self.args.noise_block, pool_first=False, bias_after_pool=False,
                fused_conv_pool=False, pairwise_pool=False, device=self.device,
            )  # fmt: skip
            args = self.args
            self.reference = plain.certify_batch(
                self.images, self.indices, args.n0, args.n, args.alpha
            )
        same = [
            (a.top_class, a.count_a) == (b.top_class, b.count_a)
            for a, b in zip(certificates, self.reference, strict=True)
        ]
        return sum(same) / len(same)

    def noise(self) -> None:
        """Samples/s of drawing the seeded noise blocks alone (what certify adds to the forward)."""
        args = self.args
        buffer = torch.empty(args.noise_block, *self.shape, device=self.device)
        generator = torch.Generator(device=self.device)
        streams = [(0, args.n0), (1, args.n)]

        def draw() -> None:
            for seed, rows in smoothing._noise_blocks(0, self.indices, streams, args.noise_block):
                generator.manual_seed(seed)
                block = buffer[:rows]
                torch.randn(block.shape, generator=generator, out=block)

        rates = time_interleaved({"noise": (draw, self.total)}, self.device, args.repeats)
        self.results["noise"] = summary(rates["noise"])

    def peers(self) -> None:
        args, device = self.args, self.device
        methods: dict[str, tuple[Callable[[], object], int]] = {}

        def loop() -> None:
            for x in self.images:
                locuslab_loop(self.model, x, args.n0, args.batch_size, args.sigma)
                locuslab_loop(self.model, x, args.n, args.batch_size, args.sigma)

        methods["loop"] = (loop, self.total)
        try:
            from art.estimators.certification.randomized_smoothing import (
                PyTorchRandomizedSmoothing,
            )
        except ImportError:
            self.skipped.append("ART (not installed)")
        else:
            art = PyTorchRandomizedSmoothing(
                model=self.model,
                loss=nn.CrossEntropyLoss(),
                input_shape=self.shape,
                nb_classes=NUM_CLASSES,
                device_type="gpu" if device.type == "cuda" else "cpu",
                sample_size=args.n0,
                scale=args.sigma,
                alpha=args.alpha,
            )
            images_np = self.images.cpu().numpy()
            methods["ART"] = (
                lambda: art.certify(images_np, n=args.n, batch_size=args.batch_size),
                self.total,
            )
        smooth = Smooth(self.model, NUM_CLASSES, args.sigma, batch_size=args.batch_size)
        methods["ours_fp32"] = (
            lambda: smooth.certify_batch(self.images, self.indices, args.n0, args.n, args.alpha),
            self.total,
        )
        # the peers evaluate the model as written: ours without its rewrites too (pairwise
        # pools and ReLU after max-pooling are the CPU defaults), so the table shows both shares
        written = Smooth(
            self.model, NUM_CLASSES, args.sigma, batch_size=args.batch_size, pool_first=False,
            bias_after_pool=False, fused_conv_pool=False, pairwise_pool=False,
        )  # fmt: skip
        methods["ours_as_written"] = (
            lambda: written.certify_batch(self.images, self.indices, args.n0, args.n, args.alpha),
            self.total,
        )
        rates = time_interleaved(methods, device, args.repeats)
        self.results["peers"] = {name: summary(r) for name, r in rates.items()}

    def resnet(self) -> None:
        """Seconds per CIFAR image at n0 = 100, n = 100,000, from a run at a small n.

        CifarResNet18 costs 1.11 GFLOP per 32x32 sample, so 2 s per image at n = 100,000 needs
        56 TFLOP/s: beyond IEEE fp32 on an H100 (67 TFLOP/s peak without tensor cores), easy for
        TF32 and bf16, which is why all three are timed.
        """
        args, device = self.args, self.device
        torch.manual_seed(0)
        model = self.backbones.CifarResNet18(3, NUM_CLASSES).to(device).eval()
        image = torch.rand(1, 3, 32, 32, device=device)
        batch = 1000 if device.type == "cuda" else 100
        rows = {}
        for name in args.resnet_variants.split(",") if device.type == "cuda" else ("fp32",):
            if self.left() < 5:
                self.skipped.append(f"resnet18 {name} (time budget)")
                continue
            options = parse_variant(name)
            smooth = Smooth(
                model,
                NUM_CLASSES,
                args.sigma,
                batch_size=batch,
                autocast_dtype=options["autocast_dtype"],
                tf32=options["tf32"],
                cudnn_benchmark=options["cudnn_benchmark"],
                device=device,
            )
            n0 = min(args.n0, args.resnet_n)

            def certify(smooth: Smooth = smooth, n0: int = n0) -> None:
                smooth.certify_batch(image, [0], n0, args.resnet_n, args.alpha)

            rate = max(time_interleaved({name: (certify, n0 + args.resnet_n)}, device, 2)[name])
            rows[name] = {"samples_per_s": rate, "seconds_per_image_at_n_100000": 100_100 / rate}
        flops = flops_per_sample(model, (3, 32, 32), device)
        self.results["resnet18"] = {"n": args.resnet_n, "batch_size": batch, "flops": flops, **rows}

    def sweep(self) -> None:
        """Bare forward samples/s against batch size (eager fp32 and bf16): pick the batch size."""
        args, device = self.args, self.device
        sizes = [args.batch_size // 4, args.batch_size // 2, args.batch_size, 2 * args.batch_size]
        table: dict[str, dict[int, float]] = {}
        for name in args.sweep_variants.split(","):
            table[name] = {}
            for size in (s for s in sizes if s > 0):
                if self.left() < 5:
                    self.skipped.append(f"sweep {name} {size} (time budget)")
                    continue
                forward = bare_forward(self.model, parse_variant(name), size, self.shape, device)
                iterations = max(1, round(self.total / size))

                def forwards(forward=forward, iterations=iterations) -> None:
                    for _ in range(iterations):
                        forward()

                rate = time_interleaved({"f": (forwards, iterations * size)}, device, args.repeats)
                table[name][size] = max(rate["f"])
        self.results["batch_size_sweep"] = table

    def profile(self) -> None:
        """Device time per kernel of one variant's bare forward (``torch.profiler``).

        Records the top kernels by total device time over a few forward passes, so that the
        split between convolutions, pointwise ops and pooling can be read off one run.
        """
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        name = self.args.profile_variant
        options = parse_variant(name)
        forward = bare_forward(self.model, options, self.args.batch_size, self.shape, self.device)
        forward()
        synchronize(self.device)
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with torch_profile(activities=activities) as prof:
            for _ in range(5):
                forward()
            synchronize(self.device)
        attribute = "device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        events = sorted(
            prof.key_averages(), key=lambda e: getattr(e, attribute, 0) or 0, reverse=True
        )
        # device kernels on CUDA (not the ops that launch them: those would count each kernel's
        # time again); on CPUs every op's own time (the two never count twice)
        on_cuda = self.device.type == "cuda"
        events = [e for e in events if not on_cuda or e.device_type.name != "CPU"]
        total = sum(getattr(e, attribute, 0) or 0 for e in events)
        rows = [
            {
                "name": e.key[:90],
                "us_per_forward": (getattr(e, attribute, 0) or 0) / 5,
                "calls": e.count,
            }
            for e in events[:15]
        ]
        self.results["profile"] = {"variant": name, "total_us_per_forward": total / 5, "top": rows}


# ----------------------------------------------------------------------------- report


def report(bench: Bench) -> str:
    """A compact table of everything measured."""
    r, args = bench.results, bench.args
    env = r.get("environment", {})
    lines = [
        f"device={env.get('gpu', env.get('device'))} torch={env.get('torch')} "
        f"threads={env.get('threads')} clock={args.clock} malloc={args.malloc} model={args.model} "
        f"batch_size={args.batch_size} "
        f"n0={args.n0} n={args.n} images={args.images} noise_block={args.noise_block}",
    ]
    flops = r.get("flops_per_sample")
    matmul = r.get("matmul_tflops", {})
    if flops:
        lines.append(
            f"model FLOPs/sample={flops / 1e6:.2f}M; matmul TFLOP/s: "
            + ", ".join(f"{k}={v:.2f}" for k, v in matmul.items())
        )
    variants = r.get("variants", {})
    best_forward: dict[str, float] = {}
    for name, row in variants.items():
        precision = name.split("+")[0]
        best_forward[precision] = max(best_forward.get(precision, 0.0), row["forward"]["best"])
    header = (
        f"{'variant':24s} {'certify/s med':>14s} {'[best]':>12s} {'forward/s best':>15s} "
        f"{'cert/fwd':>8s} {'cert/best':>9s} {'TFLOP/s':>8s} {'%matmul':>8s} {'same':>5s} "
        f"{'certs':>5s}"
    )
    # same: the rewritten model's logits, bit for bit; certs: the share of images certified as
    # the plain IEEE float32 Smooth certifies them (-: other noise blocks)
    lines += [header, "-" * len(header)]
    suspicious = []
    for name, row in variants.items():
        precision = name.split("+")[0]
        cert, fwd = row["certify"], row["forward"]
        ratio = cert["best"] / fwd["best"]
        ratio_best = cert["best"] / best_forward[precision]
        achieved = cert["best"] * (flops or 0) / 1e12
        ceiling = matmul.get(precision)
        percent = f"{100 * achieved / ceiling:7.1f}%" if ceiling else "      -"
        row.update(ratio=ratio, ratio_to_best_forward=ratio_best, tflops=achieved)
        agreement = row.get("same_certificates")
        lines.append(
            f"{name:24s} {cert['median']:14,.0f} {cert['best']:12,.0f} {fwd['best']:15,.0f} "
            f"{ratio:8.2f} {ratio_best:9.2f} {achieved:8.3f} {percent:>8s} "
            f"{'yes' if row.get('same_logits') else 'no':>5s} "
            f"{'-' if agreement is None else f'{agreement:.2f}':>5s}"
        )
        # levers that change the rounding (biases after pooling: oneDNN fuses the bias on CPUs)
        rounding = ("channels_last", "compile", "cudnn_benchmark", "fused_conv_pool")
        rounding += ("bias_after_pool",)
        exact = precision == "fp32" and not any(row["options"].get(f) == "True" for f in rounding)
        if exact and agreement is not None and agreement < 1:
            suspicious.append(f"{name} certifies {agreement:.0%} of images as plain fp32 does")
        if ceiling and achieved > ceiling:
            suspicious.append(f"{name} is above the measured matmul rate: its count is wrong")
    lines += [f"WARNING: {line}" for line in suspicious]
    if flops and variants:
        lines.append("forward pass alone (best of each variant):")
        for name, row in variants.items():
            achieved = row["forward"]["best"] * flops / 1e12
            ceiling = matmul.get(name.split("+")[0])
            share = f" = {100 * achieved / ceiling:.1f}% of the matmul rate" if ceiling else ""
            written = row.get("forward_relu_first", {}).get("best")
            written = written if row["options"].get("pool_first") == "True" else None
            gain = (
                f"; x{row['forward']['best'] / written:.2f} over the model as written"
                if written
                else ""
            )
            lines.append(f"  {name:22s} {achieved:8.3f} TFLOP/s{share}{gain}")
    if "noise" in r:
        lines.append(f"noise blocks alone: {r['noise']['best']:,.0f} samples/s (best)")
    if "peers" in r:
        peers = r["peers"]
        ours, written = peers["ours_fp32"]["median"], peers["ours_as_written"]["median"]
        text = ", ".join(
            f"{k} {v['median']:,.0f}/s (ours/{k} {ours / v['median']:.2f}, "
            f"as written {written / v['median']:.2f})"
            for k, v in peers.items()
            if not k.startswith("ours")
        )
        lines.append(
            f"peers (fp32, contiguous): ours {ours:,.0f}/s (its defaults), {written:,.0f}/s "
            f"(the model as written, as the peers run it); {text}"
        )
    if "resnet18" in r:
        res = r["resnet18"]
        text = ", ".join(
            f"{k} {v['seconds_per_image_at_n_100000']:.2f} s/image ({v['samples_per_s']:,.0f}/s)"
            for k, v in res.items()
            if isinstance(v, dict)
        )
        lines.append(
            f"CifarResNet18 ({res['flops'] / 1e9:.2f} GFLOP/sample) at n=100,000 "
            f"(from n={res['n']}): {text}"
        )
    if "batch_size_sweep" in r:
        for name, row in r["batch_size_sweep"].items():
            text = ", ".join(f"{size}: {rate:,.0f}" for size, rate in row.items())
            lines.append(f"forward sweep {name} (batch: samples/s): {text}")
    if "profile" in r:
        prof = r["profile"]
        lines.append(
            f"profile of the {prof['variant']} forward: {prof['total_us_per_forward']:,.0f} us "
            "per forward pass in all; top kernels (us per forward, calls):"
        )
        for row in prof["top"]:
            lines.append(f"  {row['us_per_forward']:10,.0f}  {row['calls']:5d}  {row['name']}")
    for name, error in r.get("errors", {}).items():
        lines.append(f"ERROR {name}: {error.splitlines()[0] if error else error}")
    if bench.skipped:
        lines.append("skipped: " + ", ".join(bench.skipped))
    lines.append(f"total time {time.perf_counter() - bench.started:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Measure what the options ask for; print the table; return every number.

    A bad option is one ``error:`` line and exit status 2 before any measurement.
    """
    global CLOCK
    args = parse_args(argv)
    try:
        check_args(args)
    except SettingError as err:
        refuse(err)
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.malloc == "retain":
        retain_freed_memory()
    bench = Bench(args)
    names = args.variants.split(",")
    eager = [name for name in names if "compile" not in name.split("+")]
    steps: list[tuple[str, Callable[[], object], float]] = [
        ("environment", bench.environment, 0),
        ("matmul", bench.matmul, 5),
        # compiled variants last: their compilation takes the longest
        *((name, lambda name=name: bench.variant(name), 15) for name in eager),
        *([("profile", bench.profile, 5)] if args.profile else []),
        ("noise", bench.noise, 5),
        *([("resnet18", bench.resnet, 10)] if args.resnet else []),
        *((n, lambda n=n: bench.variant(n), 30) for n in names if n not in eager),
        *([("peers", bench.peers, 10)] if args.peers else []),
        *([("sweep", bench.sweep, 10)] if args.sweep else []),
    ]
    try:
        for name, step, need_s in steps:
            bench.guarded(name, step, need_s=need_s)
            save(bench)  # an interrupted run (a time limit's SIGINT) keeps what it measured
    except KeyboardInterrupt:
        bench.skipped.append("everything after an interrupt")
        print("interrupted: the table and the JSON hold what was measured", file=sys.stderr)
    text = report(bench)
    print(text)
    save(bench)
    return bench.results


def save(bench: Bench) -> None:
    """Write every number measured so far to ``--json`` (if set), replacing the file whole."""
    bench.results["skipped"] = bench.skipped
    if bench.args.json:
        partial = bench.args.json.with_name(bench.args.json.name + ".partial")
        partial.write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
        partial.replace(bench.args.json)


if __name__ == "__main__":
    # a measurement that failed (a traceback above, ERROR in the table) is no success
    raise SystemExit(1 if "errors" in main() else 0)
