"""What Triton makes of the fused first-block kernel for a Hopper GPU (sm_90), without a GPU.

``robust.fused_conv_pool``'s kernel is autotuned over block sizes and warps on the GPU; how fast
each configuration can be depends on the code Triton generates, which changes between Triton
releases. This script compiles every autotuned configuration for LeNet's first block (1 -> 20
channels, 5x5, 28x28 images) for sm_90 with the installed Triton and prints, per configuration:
registers and stack (spilled registers) per thread (``cuobjdump`` from Triton's package), and in
the loop over the taps the float32 multiply-adds and global loads per thread, their ratio, and
whether the weights are vector loads. No speed is measured: that needs a GPU
(``benchmarks/gpu_session.sh``, ``PLAN=speed``, records the autotuner's choice and timings).

Examples::

    python benchmarks/fused_kernel_code.py                       # the installed Triton
    PYTHONPATH=/tmp/triton36 python benchmarks/fused_kernel_code.py --json code_36.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robust import fused_conv_pool  # noqa: E402

LENET_FIRST_BLOCK = {"c_in": 1, "height": 28, "width": 28, "k": 5, "c_out": 20, "c_pad": 32}
LENET_FIRST_BLOCK |= {"hp": 12, "wp": 12, "has_bias": True, "relu": True}


DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
"""The images' and output's dtype (the weights and bias stay float32): the kernel's variants."""


def compile_for_hopper(
    block: int, warps: int, shape: dict = LENET_FIRST_BLOCK, dtype: str = "fp32"
):
    """The kernel compiled by Triton for sm_90 with 16-byte aligned pointers (as at run time).

    ``dtype``: the images' and output's (``fp32``, or ``bf16``/``fp16`` under autocast).

    Raises:
        RuntimeError: Where this Triton installation cannot compile for CUDA (no ``ptxas``).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    constants = {**shape, "block": block, "interpreted": False}
    signature = {"x_ptr": DTYPES[dtype], "w_ptr": "*fp32", "b_ptr": "*fp32"}
    signature |= {"y_ptr": DTYPES[dtype]}
    signature |= {"total": "i64", **dict.fromkeys(constants, "constexpr")}
    aligned = {(n,): [["tt.divisibility", 16]] for n in range(4)}  # PyTorch's allocations are
    jitted = triton.jit(fused_conv_pool._conv_pool_kernel)
    source = ASTSource(jitted, signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def ptx_loops(ptx: str) -> list[str]:
    """The bodies of the PTX's loops: from a label to a later branch back to it."""
    lines = ptx.splitlines()
    labels = {}
    for n, line in enumerate(lines):
        if match := re.match(r"(\$L__BB\d+_\d+):", line.strip()):
            labels[match.group(1)] = n
    loops = []
    for n, line in enumerate(lines):
        match = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if match and labels.get(match.group(1), n) < n:
            loops.append("\n".join(lines[labels[match.group(1)] : n + 1]))
    return loops


def resource_usage(cubin: bytes) -> dict | None:
    """Registers and stack bytes per thread (``cuobjdump``); None without Triton's cuobjdump."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"registers": int(registers.group(1)), "stack_bytes": int(stack.group(1))}


def describe(block: int, warps: int, dtype: str = "fp32") -> dict:
    """One configuration's code: loop counts from the PTX, registers and stack from the cubin."""
    compiled = compile_for_hopper(block, warps, dtype=dtype)
    ptx = compiled.asm["ptx"]
    loops = ptx_loops(ptx)
    loop = loops[0] if len(loops) == 1 else ""
    fmas, loads = loop.count("fma.rn.f32"), len(re.findall(r"\bld\.global", loop))
    return {
        "block": block,
        "warps": warps,
        "loops": len(loops),
        "fma_per_iteration": fmas,
        "loads_per_iteration": loads,
        "fma_per_load": round(fmas / loads, 2) if loads else None,
        "vector_weight_loads": "ld.global.v4.b32" in loop,
        "tensor_cores": "mma.sync" in ptx or "wgmma" in ptx,
        **(resource_usage(compiled.asm["cubin"]) or {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="the images' and output's dtype (bf16, fp16: the kernel under autocast)",
    )
    args = parser.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("error: Triton is not installed (it comes with PyTorch's CUDA wheels)")
        return 2
    rows = []
    for config in fused_conv_pool.compiled_kernel().configs:
        try:
            rows.append(describe(config.kwargs["block"], config.num_warps, args.dtype))
        except RuntimeError as err:
            print(f"error: this Triton cannot compile for CUDA: {err}")
            return 2
    print(f"Triton {triton.__version__}, sm_90, LeNet's first block, {args.dtype}; per thread:")
    print("block warps  registers stack  fma/iteration loads/iteration fma/load  vector weights")
    for r in rows:
        print(
            f"{r['block']:5d} {r['warps']:5d}  {r.get('registers', '?'):>9} "
            f"{r.get('stack_bytes', '?'):>5}  {r['fma_per_iteration']:13d} "
            f"{r['loads_per_iteration']:15d} {r['fma_per_load'] or 0:8.2f}  "
            f"{'yes' if r['vector_weight_loads'] else 'no'}"
        )
    if args.json:
        record = {"triton": triton.__version__, "target": "sm_90", "dtype": args.dtype}
        record["configurations"] = rows
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
