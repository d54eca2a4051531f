"""LeNet's first block as one Triton kernel (robust.fused_conv_pool), checked without a GPU.

Triton's interpreter runs the same kernel on CPU tensors. Oracles: PyTorch's convolution,
max-pool and ReLU on the same inputs (other shapes, no bias, NaN and infinities); the modules a
rewrite must leave alone; a kernel made wrong on purpose, which the layer's own first-call check
must refuse; and Smooth's certificates with the kernel against those of the model as written.
"""

from __future__ import annotations

import math
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


def cuda_sequence(x, weight, bias, relu):
    """PyTorch's CUDA layers in ``x``'s dtype, run on the CPU: the convolution's float32 sums
    rounded to the dtype, then ``output.add_(bias)`` (rounded again), pool, ReLU."""
    y = F.conv2d(x, weight)
    if bias is not None:
        y = y.add_(bias.view(1, -1, 1, 1))
    y = F.max_pool2d(y, 2)
    return F.relu(y) if relu else y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("n", "c_in", "height", "width", "k", "c_out"),
    [(3, 1, 28, 28, 5, 20), (2, 3, 11, 9, 3, 7)],
)
def test_low_precision_is_pytorchs_cuda_sequence(dtype, n, c_in, height, width, k, c_out):
    """bf16/fp16 operands: float32 sums rounded to the dtype, the bias added, rounded again."""
    torch.manual_seed(0)
    x = torch.randn(n, c_in, height, width).to(dtype)
    weight, bias = torch.randn(c_out, c_in, k, k).to(dtype), torch.randn(c_out).to(dtype)
    bias[0] = -bias[0]  # some outputs near zero: the two roundings differ from one there
    got = conv_pool(x, weight, bias, True, kernel=interpreted_kernel())
    expected = cuda_sequence(x, weight, bias, True)
    assert got.dtype == dtype and got.shape == expected.shape
    # the sums differ from PyTorch's by float32 rounding only: the same values, except where a
    # sum lies within that rounding of a boundary of the dtype's
    assert (got == expected).double().mean() > 0.995
    ulp = torch.finfo(dtype).eps * (expected.double().abs() + 1)
    assert ((got.double() - expected.double()).abs() <= ulp).all()
    # rounding once (a fused bias, as oneDNN's) is another classifier: the check must see it
    once = conv_pool(x.float(), weight.float(), bias.float(), True, kernel=interpreted_kernel())
    assert (once.to(dtype) != got).double().mean() > 0.01
    without_bias = conv_pool(x, weight, None, False, kernel=interpreted_kernel())
    assert (without_bias == cuda_sequence(x, weight, None, False)).double().mean() > 0.995


def test_the_output_is_rounded_to_nearest_even_as_pytorch_rounds():
    """Ties, overflow and NaN: each value v becomes v.to(bfloat16) (the interpreter's own
    conversion truncates: 1 + 3/256 would be 1 + 1/128, not 1 + 1/64)."""
    torch.manual_seed(2)
    special = [1 + 1 / 256, 1 + 3 / 256, -(1 + 3 / 256), 3.4e38, -3.4e38, 3.38e38, 0.0]
    special += [float("nan"), float("inf"), 2.0**-130, 1 + 2**-9]
    v = torch.cat([torch.tensor(special), torch.randn(500) * 10.0 ** torch.randint(-8, 8, (500,))])
    x = v[:, None, None, None].expand(-1, 1, 2, 2).contiguous()  # each window: four copies of v
    weight = torch.ones(1, 1, 1, 1)
    for dtype in (torch.bfloat16, torch.float16):
        # the float32 value of the window, rounded by the kernel's store to the dtype
        got = conv_pool(x, weight, None, False, kernel=interpreted_kernel())
        torch.testing.assert_close(got.flatten(), v, rtol=0, atol=0, equal_nan=True)
        y = torch.empty(len(v), 1, 1, 1, dtype=dtype)
        rounded = store_rounded(x, weight, y)
        assert torch.equal(rounded.flatten().isnan(), v.isnan())
        assert torch.equal(rounded.flatten().nan_to_num(), v.to(dtype).nan_to_num()), dtype


def store_rounded(x, weight, y):
    """The kernel on float32 ``x`` writing into ``y`` of a lower-precision dtype."""
    by_tap = torch.zeros(1, 2)
    by_tap[:, :1] = weight.reshape(1, -1).t()
    interpreted_kernel()[(math.ceil(len(x) / 64),)](
        x, by_tap, by_tap, y, len(x), c_in=1, height=2, width=2, k=1, c_out=1, c_pad=2,
        hp=1, wp=1, has_bias=False, relu=False, block=64, interpreted=True,
    )  # fmt: skip
    return y


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
    monkeypatch.setattr(FusedConvPool, "_kernel_runs_on", lambda self, x: True)
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


def test_the_layer_computes_in_the_dtype_pytorchs_convolution_would(monkeypatch):
    """Autocast's dtype, else the model's; float64, mixed dtypes and gradients: the layers."""
    forced_kernel(monkeypatch)
    calls = []
    real = fused.conv_pool

    def counted(x, weight, bias, relu, kernel=None):
        calls.append((x.dtype, weight.dtype, None if bias is None else bias.dtype))
        return real(x, weight, bias, relu, kernel=kernel)

    monkeypatch.setattr(fused, "conv_pool", counted)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2))
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's conv casts x, w and b
            got = fuse_conv_pool(net)(x)
        assert calls == [(torch.bfloat16,) * 3] and got.dtype == torch.bfloat16
        conv = net[0]
        expected = cuda_sequence(*(t.bfloat16() for t in (x, conv.weight, conv.bias)), True)
        assert (got == expected).double().mean() > 0.99
        half = net.half()  # a model in float16: its own dtype, outside autocast
        got = fuse_conv_pool(half)(x.half())
        assert calls[-1] == (torch.float16,) * 3 and got.dtype == torch.float16
        torch.testing.assert_close(got, half(x.half()), rtol=1e-3, atol=1e-3)
        calls.clear()
        wide = net.double()  # float64 and mixed dtypes: the layers themselves, and their error
        assert torch.equal(fuse_conv_pool(wide)(x.double()), wide(x.double()))
        with pytest.raises(RuntimeError, match=r"should be the same|same dtype"):
            fuse_conv_pool(wide)(x)
        assert calls == []
    net.float()
    y = fuse_conv_pool(net)(x)  # the weights want gradients: the layers, which give them
    assert calls == [] and y.requires_grad
    y.sum().backward()
    assert net[0].weight.grad is not None


def test_the_check_refuses_a_low_precision_result_off_by_more_than_rounding(monkeypatch):
    real = forced_kernel(monkeypatch)
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2))
    x = torch.rand(5, 1, 10, 10) + 1  # pooled values of about 1: one bf16 unit is 1/128

    def three_units_off(x, weight, bias, relu, kernel=None):  # in bf16 only
        y = real(x, weight, bias, relu, kernel=interpreted_kernel())
        if y.dtype == torch.float32:
            return y
        return (y.float() + 3 * torch.finfo(y.dtype).eps * y.float().abs()).to(y.dtype)

    def truncated(x, weight, bias, relu, kernel=None):  # within a unit, but rounded otherwise
        y = real(x.float(), weight.float(), bias.float(), relu, kernel=interpreted_kernel())
        if x.dtype == torch.float32:
            return y
        return (y.view(torch.int32) & ~0xFFFF).view(torch.float32).to(x.dtype)

    layer = fuse_conv_pool(net)[0]
    with torch.no_grad():
        layer(x)  # checked in float32; in bfloat16 its first call checks again
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)  # the kernel itself passes
        assert layer.checked == {torch.float32, torch.bfloat16}
        for wrong, message in (
            (three_units_off, r"disagrees with PyTorch's layers by .* in bfloat16"),
            (truncated, r"rounds otherwise than PyTorch's layers in bfloat16: \d+% of"),
        ):
            monkeypatch.setattr(fused, "conv_pool", wrong)
            fresh = fuse_conv_pool(net)[0]
            fresh(x)  # float32: the same values as the real kernel's, passed
            with pytest.raises(RuntimeError, match=message), torch.autocast("cpu", torch.bfloat16):
                fresh(x)
            assert fresh.checked == {torch.float32}


class CudaConv(nn.Module):
    """A convolution as PyTorch's CUDA layer computes it: the sums, then ``output.add_(bias)``
    (on CPUs oneDNN adds the bias inside the convolution: one rounding in bf16, not two)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        y = F.conv2d(x, self.conv.weight)
        return y.add_(self.conv.bias.to(y.dtype).view(1, -1, 1, 1))


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
    # under bf16 autocast the kernel computes the bf16 classifier of PyTorch's CUDA layers
    low = dict(batch_size=700, pairwise_pool=False, autocast_dtype=torch.bfloat16)
    smooth = Smooth(model, 3, 0.25, fused_conv_pool=True, **low)
    got = smooth.certify_batch(images, [0, 1, 2], 20, 200, 0.01)
    assert smooth._model[0].checked == {torch.bfloat16}
    monkeypatch.undo()  # from here, a CPU: nothing is fused, the pairwise pools stay
    cuda_like = nn.Sequential(CudaConv(model[0]), *model[1:]).eval()
    expected = Smooth(cuda_like, 3, 0.25, **low).certify_batch(images, [0, 1, 2], 20, 200, 0.01)
    assert [(c.prediction, c.count_a) for c in got] == [(c.prediction, c.count_a) for c in expected]
    with pytest.raises(SettingError, match="fused_conv_pool"):
        Smooth(model, 3, 0.25, fused_conv_pool=1.5)
    on_cpu = Smooth(model, 3, 0.25, fused_conv_pool=True)
    assert on_cpu.fused_conv_pool and type(on_cpu._model[0]) is nn.Conv2d


def test_a_compiled_smooth_checks_the_kernel_before_tracing(monkeypatch):
    """The check reads values back to the host: inside torch.compile's trace it split the
    compiled step for good (11 graphs, 1.6x slower, in a reviewer's CPU experiment)."""
    forced_kernel(monkeypatch)
    # Dynamo cannot trace Triton's interpreter (a GPU's compiled kernel it can): left untraced
    monkeypatch.setattr(fused, "conv_pool", torch.compiler.disable(fused.conv_pool))
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **k: real_compile(f, backend="eager", **k))
    tracing = []
    check = FusedConvPool.check

    def recorded(self, x, y, rows=256):
        tracing.append(torch.compiler.is_compiling())
        return check(self, x, y, rows)

    monkeypatch.setattr(FusedConvPool, "check", recorded)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(54, 3)
    ).eval()
    options = dict(batch_size=300, pairwise_pool=False, fused_conv_pool=True)
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    smooth = Smooth(model, 3, 0.25, compile=True, **options)
    got = smooth.certify_batch(images, [0, 1], 20, 200, 0.01)
    assert tracing == [False] and smooth._model[0].checked == {torch.float32}
    # the eager batch first changes nothing: the certificates of the step not compiled
    expected = Smooth(model, 3, 0.25, **options).certify_batch(images, [0, 1], 20, 200, 0.01)
    assert [(c.prediction, c.count_a) for c in got] == [(c.prediction, c.count_a) for c in expected]


def test_the_certification_callback_passes_the_fusion_on():
    from lightning.pytorch import LightningModule

    from callbacks import Certification

    module = LightningModule()
    module.model, module.num_classes, module.sigma = lenet(), 10, 0.25
    assert Certification(fused_conv_pool=True)._make_smooth(module).fused_conv_pool
    assert not Certification()._make_smooth(module).fused_conv_pool
    with pytest.raises(SettingError, match="Certification fused_conv_pool must be one of"):
        Certification(fused_conv_pool="yes")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_kernel_compiles_for_a_hopper_gpu_with_float32_multiply_adds(load_script, dtype):
    """Triton compiles every autotuned configuration for sm_90 (H100, H200) without a GPU."""
    triton = pytest.importorskip("triton")
    code = load_script("benchmarks/fused_kernel_code.py")
    for config in fused.compiled_kernel().configs:
        block, warps = config.kwargs["block"], config.num_warps
        try:
            compiled = code.compile_for_hopper(block, warps, dtype=dtype)
        except RuntimeError as err:  # no ptxas in this Triton installation
            pytest.skip(f"Triton {triton.__version__} cannot compile for CUDA here: {err}")
        ptx = compiled.asm["ptx"]
        # one loop (over taps) computes the window's 4 outputs: 4 x (32 channels x the block's
        # positions over the threads) single-rounding float32 multiply-adds per thread, no TF32
        (loop,) = code.ptx_loops(ptx)
        fmas = loop.count("fma.rn.f32")
        assert fmas == 4 * 32 * block // (32 * warps), (block, warps)
        assert "mma.sync" not in ptx and "wgmma" not in ptx
        if dtype == "bf16":  # bf16 images widened; the output rounded to nearest even
            assert "cvt.f32.bf16" in ptx and "cvt.rn.bf16.f32" in ptx
            assert not re.search(r"cvt\.rz[.\w]*bf16", ptx)
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


def test_the_kernel_source_runs_where_torch_compile_copies_it():
    """Inductor copies a user kernel's source into a module that imports only ``triton`` and
    ``triton.language as tl``: an alias in the annotations (``constexpr``) was a NameError
    there, so the compiled variant with the kernel failed on the GPU."""
    pytest.importorskip("triton")
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import (
        user_defined_triton_kernel_transitive_closure_source_code as kernel_source,
    )

    header = TritonKernel.gen_common_triton_imports()
    module = f"{header}\n{kernel_source(fused.compiled_kernel().fn)}"
    namespace: dict = {}
    exec(compile(module, "<inductor copy>", "exec", dont_inherit=True), namespace)
    assert "_conv_pool_kernel" in namespace


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
    """Each dtype's choice and timings, noted at the launch that tuned it: Triton's own record
    (configs_timings) holds only the latest tuning, whatever its dtype."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(fused, "_TUNED", {})
    assert fused.autotuning_record() is None  # nothing tuned yet
    configs = fused.compiled_kernel().configs
    small, large = configs[0], configs[-1]
    tuner = type("Tuner", (), {})()
    tuner.best_config, tuner.configs_timings = large, {small: [2.0], large: [1.5]}
    fused._note_tuning(tuner, "float32 1x28x28, 5x5 to 20")
    tuner.best_config, tuner.configs_timings = small, {small: [0.7], large: [0.9]}
    fused._note_tuning(tuner, "bfloat16 1x28x28, 5x5 to 20")
    tuner.best_config = large  # float32 again: Triton's timings are still bfloat16's
    fused._note_tuning(tuner, "float32 1x28x28, 5x5 to 20")
    record = fused.autotuning_record()
    assert record["triton"] == triton.__version__
    assert record["tuned"] == {
        "float32 1x28x28, 5x5 to 20": {
            "best": "block 256, 8 warps",
            "ms": {"block 64, 4 warps": [2.0], "block 256, 8 warps": [1.5]},
        },
        "bfloat16 1x28x28, 5x5 to 20": {
            "best": "block 64, 4 warps",
            "ms": {"block 64, 4 warps": [0.7], "block 256, 8 warps": [0.9]},
        },
    }
