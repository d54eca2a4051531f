"""The certification benchmark runs end to end at a tiny size, as on a GPU machine without peers.

Oracles: LeNet's FLOPs counted by hand, the JSON and table it must write, and the GPU defaults it
must parse (the GPU machine has no ART, so the peers must be skipped there, not crash).
"""

from __future__ import annotations

import builtins
import json

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/certify.py")


def test_lenet_flops_per_sample(bench) -> None:
    lenet = bench.load_backbones().LeNet(1, 10)
    # 2 * multiply-adds: conv 1->20 5x5 on 24x24, conv 20->50 5x5 on 8x8, fc 800->500, fc 500->10
    by_hand = 2 * (20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10)
    assert bench.flops_per_sample(lenet, (1, 28, 28), torch.device("cpu")) == by_hand == 4_586_000


def test_gpu_defaults_parse(bench) -> None:
    args = bench.parse_args(["--device", "cuda"])
    assert (args.n, args.batch_size, args.resnet, args.sweep, args.peers) == (
        100_000,
        50_000,
        True,
        True,
        False,
    )
    options = [bench.parse_variant(v) for v in args.variants.split(",")]
    assert {o["precision"] for o in options} == {"fp32", "tf32", "bf16"}
    assert any(o["compile"] for o in options) and any(o["cuda_graph"] for o in options)
    assert any(o["cudnn_benchmark"] for o in options)
    with pytest.raises(SystemExit):
        bench.parse_variant("fp64+cl")


def test_tiny_cpu_run_without_art(bench, tmp_path, monkeypatch, capsys) -> None:
    real_import = builtins.__import__

    def no_art(name, *args, **kwargs):
        if name.startswith("art"):
            raise ImportError("no ART here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_art)
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--images", "1", "--n", "300", "--batch-size", "200"]
    argv += ["--noise-block", "128", "--repeats", "1", "--matmul-size", "128", "--peers"]
    argv += ["--variants", "fp32,fp32+cl+graph+nb64,fp32+cb+pf+pb+fc", "--json", str(out)]
    results = bench.main([*argv, "--profile", "--profile-variant", "fp32+cl+graph+nb64"])
    printed = capsys.readouterr().out
    assert "errors" not in results
    # the written model's logits: exactly, unless a CPU convolution's fused bias rounds otherwise
    assert results["variants"]["fp32"]["same_logits"] is True
    moved = results["variants"]["fp32+cb+pf+pb+fc"]
    assert moved["max_logit_difference"] < 1e-4 and moved["same_predictions"] >= 0.99
    for name in ("fp32", "fp32+cl+graph+nb64", "fp32+cb+pf+pb+fc"):
        row = results["variants"][name]
        assert row["certify"]["best"] > 0 and row["forward"]["best"] > 0
        assert row["forward_relu_first"]["best"] > 0  # the model as written: the lever's effect
        assert row["ratio"] == pytest.approx(row["certify"]["best"] / row["forward"]["best"])
        assert name in printed
    assert set(results["peers"]) == {"loop", "ours_fp32", "ours_as_written"}
    assert all(row["same_certificates"] in (1.0, None) for row in results["variants"].values())
    assert "ART (not installed)" in results["skipped"]
    assert json.loads(out.read_text())["flops_per_sample"] == 4_586_000
    assert "%matmul" in printed and "noise blocks alone" in printed
    # the profile names where the variant's forward spends its time: the convolutions
    profile = results["profile"]
    assert profile["variant"] == "fp32+cl+graph+nb64" and profile["total_us_per_forward"] > 0
    assert any("conv" in row["name"] for row in profile["top"][:5])
    assert "profile of the fp32+cl+graph+nb64 forward" in printed
    with pytest.raises(SystemExit):  # an unknown --profile-variant: refused before measuring
        bench.main([*argv, "--profile", "--profile-variant", "fp32+xx"])


def test_same_logits_fails_for_a_rewrite_that_changes_the_model(bench, monkeypatch) -> None:
    lenet = bench.load_backbones().LeNet(1, 10)
    options = bench.parse_variant("fp32+pf+pb+mp")
    device = torch.device("cpu")
    rewritten = bench.evaluated_model(lenet, options, device)
    check = bench.same_logits(lenet, rewritten, options, 64, (1, 28, 28), device)
    assert check["same_predictions"] == 1.0
    with torch.no_grad():
        rewritten[-1].bias.add_(1e-3)
    check = bench.same_logits(lenet, rewritten, options, 64, (1, 28, 28), device)
    assert check["same_logits"] is False and check["max_logit_difference"] > 5e-4


def test_a_fast_path_that_certifies_something_else_is_flagged(bench, monkeypatch, capsys) -> None:
    """A Smooth path returning constant logits ran at 17x the forward, with 'same yes', exit 0."""
    import robust.smoothing as smoothing

    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(x), 10, device=x.device).index_fill_(1, torch.tensor([3]), 1.0)

    monkeypatch.setattr(smoothing, "pairwise_max_pool", lambda module: Constant())
    argv = ["--device", "cpu", "--images", "2", "--n", "400", "--batch-size", "200"]
    argv += ["--repeats", "1", "--matmul-size", "64", "--no-peers", "--variants", "fp32"]
    results = bench.main(argv)
    assert results["variants"]["fp32"]["same_logits"] is False
    assert results["variants"]["fp32"]["same_certificates"] < 1
    assert "WARNING: fp32 certifies" in capsys.readouterr().out


def test_an_interrupted_run_keeps_what_it_measured(bench, tmp_path, monkeypatch, capsys) -> None:
    """A time limit's SIGINT used to lose every number: the JSON was written only at the end."""

    def interrupted(self) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.Bench, "noise", interrupted)  # after the eager variants
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--images", "1", "--n", "200", "--batch-size", "100"]
    argv += ["--repeats", "1", "--matmul-size", "64", "--no-peers", "--variants", "fp32"]
    results = bench.main([*argv, "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["variants"]["fp32"]["certify"]["median"] > 0
    assert "everything after an interrupt" in saved["skipped"] == results["skipped"]
    assert "interrupted" in capsys.readouterr().err


def test_budget_skips_instead_of_overrunning(bench, capsys) -> None:
    argv = ["--device", "cpu", "--images", "1", "--n", "100", "--budget-s", "0", "--no-peers"]
    results = bench.main(argv)
    assert "variants" not in results
    assert any("time budget" in s for s in results["skipped"])
    assert "skipped:" in capsys.readouterr().out


def refusal(main, argv: list[str], capsys) -> str:
    """The one ``error:`` line of a script's ``main(argv)`` refusing its options (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--threads", "0"], "--threads must be an integer >= 1; got 0"),
        (["--device", "banana"], "--device must be cpu, cuda or cuda:N; got 'banana'"),
        (["--sigma", "0"], "--sigma must be a number > 0; got 0.0"),
        (["--alpha", "1.5"], "--alpha must be a number in (0, 1); got 1.5"),
        (["--n", "0"], "--n must be an integer in [1, "),
        (["--n0", "0"], "--n0 must be an integer >= 1; got 0"),
        (["--variants", "fp32,fp64"], "--variants must be comma-separated variants PRECISION"),
        (
            ["--variants", "fp32+nb0"],
            "with PRECISION fp32, tf32 or bf16 and N >= 1; got 'fp32+nb0'",
        ),
        (["--sweep-variants", "bf17"], "--sweep-variants must be comma-separated variants"),
        (["--json", "no/such/folder/b.json"], "--json must be a file path in an existing folder"),
    ],
)
def test_bad_options_are_refused_before_any_measurement(
    bench, monkeypatch, capsys, argv, message
) -> None:
    """They used to fail inside guarded(): a traceback after the matmul benchmark, exit status 0."""

    def measure(*args, **kwargs):
        raise AssertionError("measurement started")

    monkeypatch.setattr(bench, "Bench", measure)
    assert message in refusal(bench.main, ["--device", "cpu", *argv], capsys)


@pytest.fixture(scope="module")
def attacks_script(load_script):
    return load_script("benchmarks/attacks.py")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--threads", "0"], "--threads must be an integer >= 1; got 0"),
        (["--device", "banana"], "--device must be cpu, cuda or cuda:N; got 'banana'"),
        (["--eps-inf", "-0.1"], "--eps-inf must be a number >= 0; got -0.1"),
        (["--steps", "0"], "--steps must be an integer >= 1; got 0"),
        (["--queries", "0"], "--queries must be an integer >= 1; got 0"),
        (
            ["--crosscheck", "--norms", "inf,l2"],
            "--norms (comma-separated) must be one of 'inf', '2'",
        ),
        (["--attacks", "pdg"], "--attacks takes comma-separated prefixes of the rows 'fgm-linf"),
        (["--crosscheck", "--attacks", "fgm"], "prefixes of the rows 'apgd-ce', 'apgd-t'"),
    ],
)
def test_attack_benchmark_refuses_bad_options_before_training(
    attacks_script, monkeypatch, capsys, argv, message
) -> None:
    def train(*args, **kwargs):
        raise AssertionError("the model was trained")

    monkeypatch.setattr(attacks_script, "trained_model", train)
    assert message in refusal(attacks_script.main, argv, capsys)


def test_attack_benchmark_builds_its_attack_specs_first(attacks_script) -> None:
    args = attacks_script.argparse.Namespace(
        crosscheck=True, norms="inf,2", eps_inf=0.3, eps_2=2.0, cross_queries=100
    )
    keys = [spec.key for spec in attacks_script.attack_specs(args)]
    assert "square_l2_eps2_q100" in keys and len(keys) == 8


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--threads", "0"], "--threads must be an integer >= 1; got 0"),
        (["--device", "banana"], "--device must be cpu, cuda or cuda:N; got 'banana'"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1; got 0"),
    ],
)
def test_training_benchmark_refuses_bad_options(load_script, capsys, argv, message) -> None:
    train = load_script("benchmarks/train.py")
    assert message in refusal(train.main, argv, capsys)
