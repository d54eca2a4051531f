"""LeNet's first block as one Triton kernel (robust.fused_conv_pool), checked without a GPU.

Triton's interpreter runs the same kernel on CPU tensors. Oracles: PyTorch's convolution,
max-pool and ReLU on the same inputs (other shapes, no bias, NaN and infinities); the modules a
rewrite must leave alone; a kernel made wrong on purpose, which the layer's own first-call check
must refuse; and Smooth's certificates with the kernel against those of the model as written.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust.fused_conv_pool as fused
from lightning_modules.backbones import LeNet, Normalize
from robust.checks import SettingError
from robust.fused_conv_pool import FusedConvPool, conv_pool, fuse_conv_pool, interpreted_kernel
from robust.smoothing import Smooth


def reference(x, weight, bias, relu):
    y = F.max_pool2d(F.conv2d(x, weight, bias), 2)
    return F.relu(y) if relu else y


@pytest.mark.parametrize(
    ("n", "c_in", "height", "width", "k", "c_out", "bias", "relu"),
    [
        (3, 1, 28, 28, 5, 20, True, True),  # LeNet's first block
        (2, 3, 11, 9, 3, 7, False, False),  # odd sizes (floor mode), RGB, 7 channels
        (1, 2, 6, 7, 2, 33, True, True),  # more channels than a power of two holds
    ],
)
def test_the_kernel_computes_pytorchs_layers(n, c_in, height, width, k, c_out, bias, relu):
    torch.manual_seed(0)
    x = torch.randn(n, c_in, height, width)
    weight, b = torch.randn(c_out, c_in, k, k), torch.randn(c_out) if bias else None
    expected = reference(x, weight, b, relu)
    got = conv_pool(x, weight, b, relu, kernel=interpreted_kernel())
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a channels-last input is read as the same images
    last = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(conv_pool(last, weight, b, relu, kernel=interpreted_kernel()), got)


def test_nan_and_infinities_propagate_as_in_pytorch():
    torch.manual_seed(1)
    x = torch.randn(2, 1, 12, 12)
    x[0, 0, 2, 3], x[1, 0, 7, 7], x[1, 0, 0, 11] = float("nan"), float("inf"), -float("inf")
    weight, bias = torch.randn(4, 1, 3, 3), torch.randn(4)
    expected = reference(x, weight, bias, True)
    got = conv_pool(x, weight, bias, True, kernel=interpreted_kernel())
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().any()
    torch.testing.assert_close(got.nan_to_num(), expected.nan_to_num(), rtol=1e-5, atol=1e-5)


def lenet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Normalize([0.1307], [0.3081]), LeNet(1, 10)).eval()


def test_lenet_fuses_its_first_block_only():
    fast = fuse_conv_pool(lenet())
    kinds = [type(m).__name__ for m in fast[1]]
    assert kinds[:6] == ["FusedConvPool", "Identity", "Identity", "Conv2d", "ReLU", "MaxPool2d"]
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():  # a CPU tensor: the layers themselves run, exactly
        assert torch.equal(fast(x), lenet()(x))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Conv2d(1, 4, 3, stride=2),
        nn.Conv2d(2, 4, 3, groups=2),
        nn.Conv2d(20, 50, 5),  # 500 taps: cuDNN's business
        nn.Conv2d(1, 65, 3),
        type("MyConv", (nn.Conv2d,), {})(1, 4, 3),
    ],
)
def test_only_small_plain_convolutions_are_fused(conv):
    net = nn.Sequential(conv, nn.MaxPool2d(2), nn.ReLU())
    assert fuse_conv_pool(net) is net
    for pool in (nn.MaxPool2d(3), nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2)):
        unfusable = nn.Sequential(nn.Conv2d(1, 4, 3), pool)
        assert fuse_conv_pool(unfusable) is unfusable
    for order in ([nn.ReLU(), nn.MaxPool2d(2)], [nn.MaxPool2d(2), nn.ReLU()], [nn.MaxPool2d(2)]):
        fusable = nn.Sequential(nn.Conv2d(1, 4, 3), *order)
        assert isinstance(fuse_conv_pool(fusable)[0], FusedConvPool)


def forced_kernel(monkeypatch):
    """Run the kernel (interpreted) wherever a fused layer would on a GPU."""
    monkeypatch.setattr(fused, "fusion_available", lambda device: True)
    monkeypatch.setattr(FusedConvPool, "_kernel_applies", lambda self, x: True)
    monkeypatch.setattr(fused, "compiled_kernel", interpreted_kernel)
    real = fused.conv_pool

    def interpreted(x, weight, bias, relu, kernel=None):
        return real(x, weight, bias, relu, kernel=interpreted_kernel())

    monkeypatch.setattr(fused, "conv_pool", interpreted)
    return real


def test_the_first_call_checks_the_kernel_and_refuses_a_wrong_one(monkeypatch):
    real = forced_kernel(monkeypatch)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    layer = fuse_conv_pool(net)[0]
    x = torch.randn(5, 1, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), net(x), rtol=1e-5, atol=1e-5)
    assert layer.checked

    def off_by_a_little(x, weight, bias, relu, kernel=None):
        return real(x, weight, bias, relu, kernel=interpreted_kernel()) + 1e-3

    monkeypatch.setattr(fused, "conv_pool", off_by_a_little)
    fresh = fuse_conv_pool(net)[0]
    wrong = r"disagrees with PyTorch's layers by 0\.001"
    with pytest.raises(RuntimeError, match=wrong), torch.no_grad():
        fresh(x)
    assert not fresh.checked


def test_smooth_with_the_kernel_certifies_as_the_written_model(monkeypatch):
    torch.manual_seed(0)  # LeNet's kind of block on 8x8 images: the interpreter is slow
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(54, 3)
    ).eval()
    images = torch.rand(3, 1, 8, 8)
    plain = Smooth(model, 3, 0.25, batch_size=700, pairwise_pool=False)
    expected = plain.certify_batch(images, [0, 1, 2], 20, 200, 0.01)
    forced_kernel(monkeypatch)
    smooth = Smooth(model, 3, 0.25, batch_size=700, pairwise_pool=False, fused_conv_pool=True)
    assert smooth.settings["fused_conv_pool"] and isinstance(smooth._model[0], FusedConvPool)
    got = smooth.certify_batch(images, [0, 1, 2], 20, 200, 0.01)
    assert smooth._model[0].checked  # the kernel ran, and agreed with the layers
    assert [(c.prediction, c.count_a, c.radius) for c in got] == [
        (c.prediction, c.count_a, c.radius) for c in expected
    ]
    with pytest.raises(SettingError, match="fused_conv_pool"):
        Smooth(model, 3, 0.25, fused_conv_pool=1.5)
    monkeypatch.undo()  # on a CPU nothing is fused: the pairwise pools stay
    on_cpu = Smooth(model, 3, 0.25, fused_conv_pool=True)
    assert on_cpu.fused_conv_pool and type(on_cpu._model[0]) is nn.Conv2d


def test_the_certification_callback_passes_the_fusion_on():
    from lightning.pytorch import LightningModule

    from callbacks import Certification

    module = LightningModule()
    module.model, module.num_classes, module.sigma = lenet(), 10, 0.25
    assert Certification(fused_conv_pool=True)._make_smooth(module).fused_conv_pool
    assert not Certification()._make_smooth(module).fused_conv_pool
    with pytest.raises(SettingError, match="Certification fused_conv_pool must be one of"):
        Certification(fused_conv_pool="yes")


def test_the_kernel_compiles_for_a_hopper_gpu_with_float32_multiply_adds(load_script):
    """Triton compiles every autotuned configuration for sm_90 (H100, H200) without a GPU."""
    triton = pytest.importorskip("triton")
    code = load_script("benchmarks/fused_kernel_code.py")
    for config in fused.compiled_kernel().configs:
        block, warps = config.kwargs["block"], config.num_warps
        try:
            compiled = code.compile_for_hopper(block, warps)
        except RuntimeError as err:  # no ptxas in this Triton installation
            pytest.skip(f"Triton {triton.__version__} cannot compile for CUDA here: {err}")
        ptx = compiled.asm["ptx"]
        # one loop (over taps) computes the window's 4 outputs: 4 x (32 channels x the block's
        # positions over the threads) single-rounding float32 multiply-adds per thread, no TF32
        (loop,) = code.ptx_loops(ptx)
        fmas = loop.count("fma.rn.f32")
        assert fmas == 4 * 32 * block // (32 * warps), (block, warps)
        assert "mma.sync" not in ptx and "wgmma" not in ptx
        # each tap's weights serve the 4 outputs, and are vector loads where a thread holds
        # channels in a row: at least 2.5 multiply-adds per load (with a loop per output and
        # the weights in PyTorch's order, one load per multiply-add)
        loads = len(re.findall(r"\bld\.global", loop))
        assert fmas >= 2.5 * loads, (block, warps, fmas, loads)
        if block >= 32 * warps:  # every warp on positions
            assert "ld.global.v4.b32" in loop, (block, warps)
        usage = code.resource_usage(compiled.asm["cubin"])
        if usage is not None:  # no registers spilled to the stack (with the pinned Triton)
            assert usage["stack_bytes"] == 0, (block, warps, usage)


def test_the_kernel_code_script_prints_every_configuration(load_script, capsys):
    pytest.importorskip("triton")
    assert load_script("benchmarks/fused_kernel_code.py").main([]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("Triton ") and len(table) == 2 + len(fused.compiled_kernel().configs)


def test_the_check_compares_with_float64_whatever_the_tf32_setting(monkeypatch):
    """A TF32 reference (cuDNN's with TF32 on) differs by 1e-3: a correct kernel was refused."""
    forced_kernel(monkeypatch)
    net = nn.Sequential(nn.Conv2d(1, 4, 5), nn.MaxPool2d(2), nn.ReLU())
    layer = fuse_conv_pool(net)[0]

    def tf32_like(x):  # what the layers give when their operands are rounded to TF32
        weight = net[0].weight.detach()
        rounded = (weight.view(torch.int32) & ~0x1FFF).view(torch.float32)
        return F.relu(F.max_pool2d(F.conv2d(x, rounded, net[0].bias), 2))

    monkeypatch.setattr(layer, "_unfused", tf32_like)
    x = torch.randn(6, 1, 12, 12) * 4
    with torch.no_grad():
        assert (tf32_like(x) - net(x)).abs().max() > 1e-4  # the reference it must not use
        layer(x)
    assert layer.checked


def test_the_autotuners_choice_is_recorded_for_benchmarks(monkeypatch):
    """Benchmarks record which configuration the autotuner chose and its timings."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(fused, "_COMPILED", None)
    assert fused.autotuning_record() is None  # nothing compiled yet
    tuner = fused.compiled_kernel()
    small, large = tuner.configs[0], tuner.configs[-1]
    monkeypatch.setattr(tuner, "best_config", large, raising=False)
    monkeypatch.setattr(tuner, "configs_timings", {small: [2.0], large: [1.5]}, raising=False)
    record = fused.autotuning_record()
    assert record["triton"] == triton.__version__
    assert record["best"] == "block 256, 8 warps"
    assert record["ms"] == {"block 64, 4 warps": [2.0], "block 256, 8 warps": [1.5]}
