"""The GPU session's helpers, on the CPU: the certify mode it picks and the results it keeps.

Oracles: hand-made benchmark figures with a known right choice (the IEEE float32 classifier when it
certifies in time, TF32 otherwise, cuDNN autotuning only where it measured faster), and a results
file that keeps every attempt of a resumed stage.
"""

from __future__ import annotations

import argparse
import json

import pytest


@pytest.fixture(scope="module")
def session(load_script):
    return load_script("benchmarks/gpu_session.py")


def options(session, tmp_path, capsys, rates: dict[str, float], seconds: float) -> str:
    variants = {name: {"certify": {"median": rate}} for name, rate in rates.items()}
    (tmp_path / "bench.json").write_text(json.dumps({"variants": variants}))
    args = argparse.Namespace(out=tmp_path, certify_images=20_000, seconds=seconds)
    session.certify_options(args)
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    ("rates", "seconds", "expected"),
    [
        # 20,000 images at n0 + n = 100,100 in 500 s need 4.004M samples/s
        ({"fp32": 4.1e6, "fp32+cb": 4.0e6, "tf32": 5e6}, 500, ""),
        ({"fp32": 4.0e6, "fp32+cb": 4.1e6, "tf32": 5e6}, 500, "--cudnn-benchmark"),
        ({"fp32": 3.2e6, "fp32+cb": 3.0e6, "tf32+cb": 3.8e6}, 500, "--tf32 --cudnn-benchmark"),
        ({"fp32": 3.2e6, "tf32": 3.9e6, "tf32+cb": 3.8e6}, 500, "--tf32"),
        ({"fp32": 3.2e6, "fp32+compile": 4.1e6, "tf32": 5e6}, 500, "--compile"),
        ({"fp32+compile": 3.6e6, "tf32": 3.9e6, "tf32+compile": 4.6e6}, 500, "--tf32 --compile"),
        # nothing fits: TF32, the fastest mode that is still a float32 model
        ({"fp32": 3.2e6, "tf32": 3.9e6}, 100, "--tf32"),
        ({"fp32": 3.2e6}, 100, "--tf32"),
    ],
)
def test_certify_options_pick_float32_when_it_fits(
    session, tmp_path, capsys, rates, seconds, expected
) -> None:
    assert options(session, tmp_path, capsys, rates, seconds) == expected


def test_record_keeps_every_attempt(session, tmp_path, capsys) -> None:
    session.record(tmp_path, "certify", {"seconds": 300})
    session.record(tmp_path, "certify", {"seconds": 100})
    session.record(tmp_path, "train", {"epochs": 30})
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == {
        "certify": {"seconds": 300},
        "certify (run 2)": {"seconds": 100},
        "train": {"epochs": 30},
    }
    assert "[certify (run 2)]" in capsys.readouterr().out
