"""Tests of Smooth's noise: distinct block seeds, full-precision Gaussian noise, static shapes.

Oracles: an enumeration of every block seed of a full-scale run (10,000 images at n0 = 100 and
n = 100,000), the inverse of the seed mixing, a Kolmogorov-Smirnov test of the noise before the
cast to a bf16 model, a linear classifier whose smoothed radius is known, and eager runs that
compiled/padded runs must reproduce.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kstest
from torch import nn

from robust import smoothing
from robust.checks import SettingError
from robust.smoothing import (
    DEFAULT_NOISE_BLOCK,
    ESTIMATION_STREAM,
    MAX_BLOCKS,
    MAX_INDEX,
    PREDICTION_STREAM,
    SELECTION_STREAM,
    Smooth,
    block_seeds,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# ----------------------------------------------------------------------------- block seeds


def test_cpu_generator_keeps_only_32_bits_of_a_seed() -> None:
    """The premise of the seed scheme: 64-bit seeds that agree in 32 bits give the same noise."""
    generator = torch.Generator()
    first = torch.randn(8, generator=generator.manual_seed(12345))
    second = torch.randn(8, generator=generator.manual_seed(12345 + 2**32))
    assert torch.equal(first, second)


def test_full_scale_block_seeds_are_distinct() -> None:
    """10,000 images x (n0 = 100 + n = 100,000) at the default block: 1.01M distinct seeds."""
    n0, n, images = 100, 100_000, 10_000
    blocks = [
        (stream, -(-num // DEFAULT_NOISE_BLOCK))
        for stream, num in ((SELECTION_STREAM, n0), (ESTIMATION_STREAM, n))
    ]
    every_image = np.arange(images)
    seeds = np.concatenate([block_seeds(0, every_image, s, count).ravel() for s, count in blocks])
    assert seeds.size == images * (1 + 100) == 1_010_000
    assert np.unique(seeds).size == seeds.size
    # The same through the sampling order Smooth uses (it must not, e.g., reuse a stream).
    order = list(smoothing._noise_blocks(0, range(50), [(0, n0), (1, n)], DEFAULT_NOISE_BLOCK))
    assert len({seed for seed, _ in order}) == len(order) == 50 * 101


def _inverse_fmix32(h: np.ndarray) -> np.ndarray:
    """Inverse of MurmurHash3's finalizer (xorshifts and odd multipliers are invertible)."""
    mask = np.uint64(0xFFFFFFFF)

    def unxorshift(x: np.ndarray, shift: int) -> np.ndarray:
        y = x
        for _ in range(32 // shift + 1):
            y = x ^ (y >> np.uint64(shift))
        return y

    h = unxorshift(h, 16)
    h = (h * np.uint64(pow(0xC2B2AE35, -1, 2**32))) & mask
    h = unxorshift(h, 13)
    h = (h * np.uint64(pow(0x85EBCA6B, -1, 2**32))) & mask
    return unxorshift(h, 16)


def test_seed_mixing_is_a_bijection_and_keys_are_injective() -> None:
    """Inverting the mixing recovers (index, stream, block): no two blocks can share a seed."""
    k0, k1 = smoothing._seed_keys(7)
    for index in (0, 1, 12_345, MAX_INDEX):
        for stream in (SELECTION_STREAM, ESTIMATION_STREAM, PREDICTION_STREAM):
            seeds = block_seeds(7, index, stream, MAX_BLOCKS).astype(np.uint64)
            key = (_inverse_fmix32(seeds ^ np.uint64(k1)) - np.uint64(k0)) & np.uint64(0xFFFFFFFF)
            index_back, rest = np.divmod(key, 3 * MAX_BLOCKS)
            stream_back, block_back = np.divmod(rest, MAX_BLOCKS)
            assert (index_back == index).all() and (stream_back == stream).all()
            assert (block_back == np.arange(MAX_BLOCKS)).all()
    assert (MAX_INDEX + 1) * 3 * MAX_BLOCKS <= 2**32 < (MAX_INDEX + 2) * 3 * MAX_BLOCKS


def test_out_of_range_indices_and_sample_counts_are_refused() -> None:
    constant = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        constant[1].weight.zero_()
        constant[1].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    smooth = Smooth(constant, 3, 0.5, noise_block=10)
    x = torch.rand(1, 1, 2, 2)
    with pytest.raises(SettingError, match=r"indices must be dataset indices in \[0, 1398100\]"):
        smooth.certify_batch(x, [MAX_INDEX + 1], 5, 10, 0.01)
    with pytest.raises(SettingError, match=r"n must be an integer in \[1, 10240\].*noise_block"):
        smooth.certify_batch(x, [0], 5, 10 * MAX_BLOCKS + 1, 0.01)
    with pytest.raises(SettingError, match="n0 must"):
        smooth.certify_batch(x, [0], 10 * MAX_BLOCKS + 1, 10, 0.01)
    with pytest.raises(SettingError, match="index"):
        block_seeds(0, MAX_INDEX + 1, 0, 1)
    # The largest allowed values still run.
    assert smooth.predict_batch(x, [MAX_INDEX], 10 * MAX_BLOCKS, 0.01) == [2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_blocks_are_distinct_streams() -> None:
    """CUDA's Philox takes the same 32-bit seeds: distinct seeds, distinct noise."""
    generator = torch.Generator(device="cuda")
    draws = []
    for seed in block_seeds(0, 3, ESTIMATION_STREAM, 64).tolist():
        draws.append(torch.randn(1000, generator=generator.manual_seed(seed), device="cuda"))
    stacked = torch.stack(draws)
    assert torch.unique(stacked[:, 0]).numel() == 64


# ----------------------------------------------------------------------------- precision


class Recorder(nn.Module):
    """A bf16 linear classifier f(x) = 1[w . x + b > 0] that keeps every input it is given."""

    def __init__(self, w: torch.Tensor, b: float, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.linear = nn.Linear(w.numel(), 1).to(dtype)
        with torch.no_grad():
            self.linear.weight.copy_(w.view(1, -1))
            self.linear.bias.fill_(b)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        score = self.linear(x.flatten(1)).squeeze(1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_noise_is_drawn_and_added_in_float32_for_a_bf16_model() -> None:
    """Issue 10 item 7: under bf16-true the noisy inputs are Gaussian until the cast at f's input."""
    sigma, num = 0.25, 4000
    x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = Recorder(torch.ones(16), -8.0)
    smooth = Smooth(model, 2, sigma, batch_size=num + 100, noise_block=1000)
    assert smooth.noise_dtype == torch.float32
    noisy = smooth.noisy_inputs(x, num, index=3, stream=ESTIMATION_STREAM)
    assert noisy.dtype == torch.float32
    z = ((noisy - x) / sigma).flatten().double().numpy()
    assert np.unique(noisy.numpy()).size > 0.99 * noisy.numel()  # bf16 would give a few hundred
    assert kstest(z, "norm").pvalue > 1e-4
    # The model saw exactly these values, cast to bf16 at its input (selection rows first).
    smooth.certify_batch(x.unsqueeze(0), [3], 100, num, 0.001)
    seen = torch.cat(model.inputs)
    assert seen.dtype == torch.bfloat16 and seen.shape[0] == 100 + num
    mismatch = (seen[100:] != noisy.to(torch.bfloat16)).float().mean().item()
    assert mismatch < 0.01  # adding the noise in bf16 disagrees on about half the values


def test_bf16_model_certifies_its_linear_radius() -> None:
    """A bf16 linear classifier: the radius approaches (w . x + b) / ||w|| from below."""
    sigma, alpha = 0.5, 0.001
    w = torch.tensor([1.0, -1.0, 0.5, 0.0] * 4)
    x = torch.full((1, 4, 4), 0.5)
    b = 1.5 * sigma * w.norm().item() - float(w @ x.flatten())  # true p_1 = Phi(1.5)
    true_radius = 1.5 * sigma
    smooth = Smooth(Recorder(w, b), 2, sigma, batch_size=20_000)
    prediction, radius = smooth.certify(x, 100, 20_000, alpha, index=1)
    assert prediction == 1 and 0.8 * true_radius < radius < true_radius + 0.02


def test_float64_model_gets_float64_noise() -> None:
    smooth = Smooth(nn.Linear(4, 2).double(), 2, 0.5)
    assert smooth.noise_dtype == torch.float64
    assert smooth.noisy_inputs(torch.zeros(4), 5).dtype == torch.float64


def test_noisy_inputs_are_the_rows_certify_classifies() -> None:
    x = torch.rand(1, 4, 4)
    model = Recorder(torch.ones(16), -8.0, dtype=torch.float32)
    smooth = Smooth(model, 2, 0.5, batch_size=10_000, noise_block=64)
    smooth.certify_batch(x.unsqueeze(0), [9], 150, 700, 0.01)
    seen = torch.cat(model.inputs)
    assert torch.equal(seen[:150], smooth.noisy_inputs(x, 150, index=9, stream=SELECTION_STREAM))
    assert torch.equal(seen[150:], smooth.noisy_inputs(x, 700, index=9, stream=ESTIMATION_STREAM))


def test_tf32_flags_are_set_and_restored() -> None:
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for allow in (False, True):
        with smoothing._tf32(allow):
            assert torch.backends.cudnn.allow_tf32 is allow
            assert torch.backends.cuda.matmul.allow_tf32 is allow
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_cudnn_benchmark_flag_is_set_restored_and_checked() -> None:
    before = torch.backends.cudnn.benchmark
    for enabled in (False, True):
        with smoothing._cudnn_benchmark(enabled):
            assert torch.backends.cudnn.benchmark is enabled
        assert torch.backends.cudnn.benchmark is before
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    # a speed option: it pads nothing (the last batch keeps its size) and is no certificate setting
    with pytest.warns(
        UserWarning, match="cudnn_benchmark applies on CUDA devices only; on cpu it is off"
    ):
        assert not Smooth(model, 2, 0.5, cudnn_benchmark=True).static_shapes
    assert "cudnn_benchmark" not in smoothing.DETERMINING_SETTINGS
    with pytest.raises(SettingError, match="cudnn_benchmark"):
        Smooth(model, 2, 0.5, cudnn_benchmark="yes")
    with pytest.raises(SettingError, match="pool_first"):
        Smooth(model, 2, 0.5, pool_first="yes")
    assert Smooth(model, 2, 0.5, channels_last=True).pool_first  # the default follows the layout


# ----------------------------------------------------------------------------- static shapes


class ShapeRecorder(nn.Module):
    """Nearest of K grey levels; records the batch size of every forward pass."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        level = x.flatten(1).mean(1, keepdim=True)
        return -((level - torch.linspace(0, 1, self.num_classes)) ** 2)


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """torch.compile with the eager backend (fast, no C++ compiler): tests the plumbing."""
    calls: list[dict] = []
    real = torch.compile

    def compile_eager(function, **kwargs):
        calls.append(kwargs)
        return real(function, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eager)
    return calls


def test_compile_pads_the_last_batch_and_does_not_count_padding(eager_compile) -> None:
    # Two images on decision boundaries (random counts), two far from them (f is constant there:
    # the last image, whose slot padded rows reuse, must count exactly n).
    images = torch.stack([torch.full((1, 3, 3), v) for v in (1 / 6, 0.5, 0.0, 1.0)])
    plain_model, static_model = ShapeRecorder(), ShapeRecorder()
    plain = Smooth(plain_model, 4, 0.1, batch_size=96, noise_block=40)
    static = Smooth(static_model, 4, 0.1, batch_size=96, noise_block=40, compile=True)
    assert static.static_shapes and not plain.static_shapes
    reference = plain.certify_batch(images, [0, 1, 2, 3], 30, 170, 0.01)
    got = static.certify_batch(images, [0, 1, 2, 3], 30, 170, 0.01)
    assert eager_compile == [{"dynamic": False}]
    # 800 rows: 8 full batches and a padded one, after one eager batch before compiling
    assert set(static_model.sizes) == {96}
    assert len(static_model.sizes) == 10 and plain_model.sizes[-1] == 800 - 8 * 96
    assert got == reference
    assert [c.count_a for c in got[2:]] == [170, 170]
    assert all(0 < c.count_a < 170 for c in got[:2])


def test_static_buffers_follow_a_growing_number_of_images(eager_compile) -> None:
    model = ShapeRecorder()
    smooth = Smooth(model, 4, 0.3, batch_size=64, noise_block=16, compile=True)
    plain = Smooth(ShapeRecorder(), 4, 0.3, batch_size=64, noise_block=16)
    for count in (1, 3, 2, 5):
        images = torch.rand(count, 1, 2, 2)
        indices = list(range(10, 10 + count))
        assert smooth.certify_batch(images, indices, 8, 40, 0.1) == plain.certify_batch(
            images, indices, 8, 40, 0.1
        )
    assert set(model.sizes) == {64}


def test_cuda_options_are_off_and_recorded_off_elsewhere() -> None:
    """A CPU certificate is never labelled TF32 (a resume with tf32 false was refused)."""
    with pytest.warns(UserWarning, match="cuda_graph, tf32, cudnn_benchmark apply on CUDA"):
        smooth = Smooth(ShapeRecorder(), 4, 0.3, cuda_graph=True, tf32=True, cudnn_benchmark=True)
    assert not smooth.static_shapes
    assert smooth.predict(torch.zeros(1, 2, 2), 50, 0.01, index=0) == 0
    settings = smooth.settings
    assert settings["device_type"] == "cpu"
    assert not (settings["tf32"] or settings["cuda_graph"] or settings["cudnn_benchmark"])
    assert settings == Smooth(ShapeRecorder(), 4, 0.3).settings


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_eager_on_cuda() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)).cuda()
    images = torch.rand(3, 1, 8, 8, device="cuda")
    eager = Smooth(model, 5, 0.5, batch_size=256, noise_block=64)
    graph = Smooth(model, 5, 0.5, batch_size=256, noise_block=64, cuda_graph=True)
    assert graph.static_shapes
    reference = eager.certify_batch(images, [0, 1, 2], 50, 1000, 0.01)
    assert graph.certify_batch(images, [0, 1, 2], 50, 1000, 0.01) == reference
