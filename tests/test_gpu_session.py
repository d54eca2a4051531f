"""The GPU session's helpers, on the CPU: the certify mode it picks and the results it keeps.

Oracles: hand-made benchmark figures with a known right choice (the IEEE float32 classifier when it
certifies in time, TF32 otherwise, cuDNN autotuning only where it measured faster), and a results
file that keeps every attempt of a resumed stage.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def session(load_script):
    return load_script("benchmarks/gpu_session.py")


def options(
    session,
    tmp_path,
    capsys,
    rates: dict[str, float],
    seconds: float,
    float32_only=False,
    overheads: dict[str, float] | None = None,
    images: int = 20_000,
) -> str:
    variants = {name: {"certify": {"median": rate}} for name, rate in rates.items()}
    for name, overhead in (overheads or {}).items():
        variants[name]["certify_first_call_overhead_s"] = overhead
    (tmp_path / "bench.json").write_text(json.dumps({"variants": variants}))
    args = argparse.Namespace(
        out=tmp_path, certify_images=images, seconds=seconds, float32_only=float32_only
    )
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
        # the rewrites and the layout are certify options too, named in one order
        ({"fp32": 3.2e6, "fp32+pb+pf": 4.1e6, "tf32": 5e6}, 500, "--pool-first --bias-after-pool"),
        (
            {"fp32+cl": 4.1e6, "fp32+pf+pb+compile": 4.2e6},
            500,
            "--pool-first --bias-after-pool --compile",
        ),
        ({"fp32+cl": 4.1e6, "fp32+pf+pb+graph": 4.0e6}, 500, "--channels-last"),
        ({"fp32+fc+pf": 5e6, "tf32+pf+pb": 6e6}, 500, "--pool-first --fused-conv-pool"),
        # another noise block or pooling kernel is no speed option of the certify stage
        ({"fp32": 3.2e6, "fp32+nb10000": 9e6, "fp32+pp": 9e6, "fp32+pf+pf": 9e6}, 500, "--tf32"),
        # nothing fits: TF32, the fastest mode that is still a float32 model
        ({"fp32": 3.2e6, "tf32": 3.9e6}, 100, "--tf32"),
        ({"fp32": 3.2e6}, 100, "--tf32"),
    ],
)
def test_certify_options_pick_float32_when_it_fits(
    session, tmp_path, capsys, rates, seconds, expected
) -> None:
    assert options(session, tmp_path, capsys, rates, seconds) == expected


def test_float32_only_picks_the_fastest_float32_mode_however_slow(session, tmp_path, capsys):
    rates = {"fp32": 3.2e6, "fp32+pf+pb+fc": 3.5e6, "tf32": 9e6}
    assert options(session, tmp_path, capsys, rates, 100, float32_only=True) == (
        "--pool-first --bias-after-pool --fused-conv-pool"
    )
    assert options(session, tmp_path, capsys, rates, 100) == "--tf32"  # the control: too slow
    assert options(session, tmp_path, capsys, {"tf32": 9e6}, 100, float32_only=True) == ""


def test_static_shape_rates_are_taken_at_the_stages_padding(session, tmp_path, capsys):
    """The benchmark's calls of 8 images pad 6.1% of their rows (17 batches of 50,000 for
    800,800 samples), the stage's rounds of 25 images 1.9%: a CUDA graph 3% behind eager in
    the benchmark is 1% ahead in the stage."""
    variants = {"fp32+cl": 3.30e6, "fp32+pf+graph": 3.20e6}
    settings = {"images": "8", "batch_size": "50000", "n0": "100", "n": "100000"}
    bench = {"variants": {k: {"certify": {"median": v}} for k, v in variants.items()}}
    args = argparse.Namespace(out=tmp_path, certify_images=10_000, seconds=0, float32_only=True)
    for recorded, expected in ((None, "--channels-last"), (settings, "--pool-first --cuda-graph")):
        (tmp_path / "bench.json").write_text(json.dumps({**bench, "settings": recorded}))
        session.certify_options(args)
        assert capsys.readouterr().out.strip() == expected
    assert session.static_padding_ratio(tmp_path / "bench.json", None) == pytest.approx(
        (850_000 / 800_800) / (2_550_000 / 2_502_500)
    )


def test_a_mode_that_compiles_pays_for_its_compilation(session, tmp_path, capsys):
    # 10,000 images at n0 + n = 100,100: 250 s at 4.0M samples/s, 238 s at 4.2M; a compiled
    # mode whose first call took 90 s longer than its samples loses; without that record, wins
    rates = {"fp32+pf+pb+fc": 4.0e6, "fp32+pf+pb+fc+compile": 4.2e6}
    overheads = {"fp32+pf+pb+fc": 1.0, "fp32+pf+pb+fc+compile": 90.0}
    fused = "--pool-first --bias-after-pool --fused-conv-pool"
    pick = options(session, tmp_path, capsys, rates, 0, True, overheads, images=10_000)
    assert pick == fused
    pick = options(session, tmp_path, capsys, rates, 0, True, images=10_000)
    assert pick == f"{fused} --compile"
    # the overhead also decides whether float32 fits the time given (here 300 s)
    assert options(session, tmp_path, capsys, {"fp32+compile": 4.2e6, "tf32": 5e6}, 300) == (
        "--tf32"
    )  # 20,000 images: 477 s
    few = {"fp32+compile": 4.2e6, "tf32": 5e6}
    assert options(session, tmp_path, capsys, few, 300, images=10_000) == "--compile"
    late = {"fp32+compile": 90.0, "tf32": 0.0}
    assert options(session, tmp_path, capsys, few, 300, False, late, images=10_000) == "--tf32"


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


@pytest.mark.parametrize(
    ("sigma", "recipe", "weight", "name"),
    [
        (0.25, "paper", 10.0, "consistency_0.25_paper"),
        (0.5, "paper", 5.0, "consistency_0.5_paper"),
        (0.25, "adam-cosine", 10.0, "consistency_0.25"),
    ],
)
def test_consistency_recipes_follow_jeong_and_shin(session, sigma, recipe, weight, name) -> None:
    """Their MNIST setting (jh-jeong/smoothing-consistency): lambda 10 at sigma 0.25, 5 at 0.5;
    SGD 0.01 with momentum 0.9 and weight decay 1e-4, the rate divided by 10 every 30 epochs."""
    args = argparse.Namespace(
        training="consistency",
        sigma=sigma,
        recipe=recipe,
        consistency_weight=None,
        smoothadv_steps=None,
    )
    model = session.noise_model(args)
    assert (model.consistency_weight, model.entropy_weight, model.num_noise_samples) == (
        weight,
        0.5,
        2,
    )
    assert session.noise_name(args) == name
    optimizer = model.optimizer_factory(model.parameters())
    scheduler = model.lr_scheduler_factory(optimizer)
    configured = model.configure_optimizers()
    assert configured["lr_scheduler"].get("interval", "epoch") == "epoch"  # stepped per epoch
    if recipe == "paper":
        assert type(optimizer).__name__ == "SGD"
        assert {k: optimizer.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 1e-4,
        }
        rates = []
        for _ in range(91):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()  # no gradients: nothing moves
            scheduler.step()
        assert rates[29:31] == pytest.approx([0.01, 0.001]) and rates[60] == pytest.approx(1e-4)
    else:
        assert type(optimizer).__name__ == "Adam"
    for weight in (3.0, 0.0):  # an explicit lambda, 0 included, wins over the default
        args.consistency_weight = weight
        assert session.noise_model(args).consistency_weight == weight


@pytest.mark.parametrize(
    ("recipe", "epochs", "steps", "warmup", "name"),
    [
        ("paper", 90, None, 10, "smoothadv-jeong_0.25_paper"),
        ("adam-cosine", 30, 2, 3, "smoothadv-jeong_0.25_steps2"),
    ],
)
def test_smoothadv_jeong_is_their_mnist_baseline(
    session, monkeypatch, recipe, epochs, steps, warmup, name
) -> None:
    """Jeong & Shin's SmoothAdv baseline (EXPERIMENTS.MD: --epsilon 255 --num-steps 10 --warmup 10
    --num-noise-vec 4, eps divided by 256 in their code); the warm-up is the first ninth of the
    epochs; other PGD step counts are named in the files, so no two trainings share weights."""
    monkeypatch.setitem(session.EPOCHS, "value", epochs)
    args = argparse.Namespace(
        training="smoothadv-jeong",
        sigma=0.25,
        recipe=recipe,
        consistency_weight=None,
        smoothadv_steps=steps,
    )
    model = session.noise_model(args)
    assert model.num_noise_samples == 4
    assert model.smoothadv_eps == 255 / 256
    assert model.smoothadv_steps == (steps or 10)
    assert model.smoothadv_warmup_epochs == warmup
    assert model.consistency_weight == 0
    assert session.noise_name(args) == name


def test_smoothadv_steps_are_refused_without_smoothadv(session, capsys) -> None:
    args = argparse.Namespace(
        training="consistency",
        sigma=0.25,
        recipe="paper",
        consistency_weight=None,
        smoothadv_steps=2,
    )
    with pytest.raises(SystemExit) as exit_info:
        session.noise_model(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: --smoothadv-steps needs a SmoothAdv --training, not consistency\n"
    )


def test_the_paper_recipe_trains_on_all_training_digits(session, monkeypatch) -> None:
    """Their code holds no validation digits out: the data module joins them to the training set,
    and every training digit is in exactly one batch of an epoch (whole batches, in one fetch)."""
    import torch
    from torch.utils.data import TensorDataset

    assert session.RECIPES["paper"][2:] == (128, True)
    splits = {0: torch.arange(0, 9), 1: torch.arange(9, 13)}  # "train" and "validation"

    def tensors(subset, limit):
        return TensorDataset(splits[subset].float().view(-1, 1, 1, 1), splits[subset])

    source = SimpleNamespace(setup=lambda stage: None, train_set=0, val_set=1, test_set=None)
    monkeypatch.setattr(session, "MNISTDataModule", lambda **kwargs: source)
    for train_on_all, train in ((True, range(13)), (False, range(9))):
        data = session.FastMNIST("unused", 4, False, train_on_all=train_on_all)
        monkeypatch.setattr(data, "_tensors", tensors)
        data.setup("fit")
        assert data.val_set.tensors[1].tolist() == [9, 10, 11, 12]
        batches = [labels.tolist() for _, labels in data.train_dataloader()]
        assert [len(labels) for labels in batches] == [4] * (len(train) // 4)  # the rest dropped
        seen = sorted(i for labels in batches for i in labels)
        assert len(set(seen)) == len(seen) and set(seen) <= set(train)
        assert len(seen) == len(train) - len(train) % 4


def test_a_refused_setting_is_one_error_line(session, monkeypatch, tmp_path, capsys) -> None:
    """A stage refusing a setting (a TSV to resume written with other settings) ends with one
    ``error:`` line and exit status 2, not a traceback."""

    def refuse(args) -> None:
        raise session.SettingError("Certification output c.tsv was written with other settings")

    monkeypatch.setitem(session.STAGES, "certify", refuse)
    monkeypatch.setattr("sys.argv", ["gpu_session.py", "certify", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        session.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: Certification output c.tsv was written with other settings\n"
    )


def run_main(session, monkeypatch, capsys, *argv: str) -> str:
    """``gpu_session.py ARGV``'s one ``error:`` line (it must refuse with exit status 2)."""
    monkeypatch.setattr("sys.argv", ["gpu_session.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        session.main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error


NOISE_ARGS = {
    "training": "gaussian",
    "sigma": 0.25,
    "recipe": "adam-cosine",
    "consistency_weight": None,
    "smoothadv_steps": None,
}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (None, r"noise_state\.pt is missing"),
        (b"garbage", r"noise_state\.pt is not a state dict of tensors"),
        ({"weight": "not a tensor"}, r"is not a state dict of tensors|does not hold a state dict"),
        ({"fc.weight": 0}, r"holds the weights of another model \(\d+ of the model's tensors"),
        ("shape", r"noise_state\.pt: \S+ is torch\.float32 of shape \(1,\), the model's is"),
        ("nan", r"noise_state\.pt: \S+ holds values that are not finite"),
        ("sparse", r"noise_state\.pt: \S+ is a torch\.sparse_coo tensor on cpu, not the dense"),
        ("memo", r"noise_state\.pt is not a state dict of tensors"),  # a KeyError while unpickling
    ],
)
def test_certify_refuses_a_bad_state_file(
    session, monkeypatch, tmp_path, capsys, state, message
) -> None:
    """The state file is untrusted: loaded with weights_only=True and checked against the model;
    the error names the file and the stage that writes it."""
    import re

    import torch

    path = tmp_path / "noise_state.pt"
    if isinstance(state, bytes):
        path.write_bytes(state)
    elif isinstance(state, dict):
        torch.save({k: torch.zeros(2) if v == 0 else v for k, v in state.items()}, path)
    elif state is not None:
        weights = session.noise_model(argparse.Namespace(**NOISE_ARGS)).state_dict()
        name = next(iter(weights))
        if state == "sparse":
            weights[name] = weights[name].to_sparse()
        else:
            weights[name] = torch.zeros(1) if state == "shape" else weights[name] * torch.nan
        torch.save(weights, path)
        if state == "memo":  # a pickle that refers to a memo entry it never stored
            path.write_bytes(b"\x80\x02h\x71.")
    error = run_main(
        session, monkeypatch, capsys, "certify", "--out", str(tmp_path), "--accelerator", "cpu"
    )
    assert re.search(message, error), error
    assert "train-noise --training gaussian --sigma 0.25" in error, error


def test_a_state_file_of_the_model_loads(session, tmp_path) -> None:
    import torch

    trained = session.noise_model(argparse.Namespace(**NOISE_ARGS))
    torch.save(trained.state_dict(), tmp_path / "noise_state.pt")
    loaded = session.load_noise(argparse.Namespace(out=tmp_path, **NOISE_ARGS))
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--skip", "0"], "error: --skip must be an integer >= 1; got 0\n"),
        (["--first-image", "-1"], "error: --first-image must be an integer >= 0; got -1\n"),
        (["--sigma", "-0.5"], "error: --sigma must be a number > 0; got -0.5\n"),
        (["--certify-batch", "0"], "error: --certify-batch must be an integer >= 1; got 0\n"),
    ],
)
def test_bad_options_are_refused_before_the_stage(
    session, monkeypatch, tmp_path, capsys, argv, message
) -> None:
    """--skip 0 used to become ``args.skip or 1``: every image certified, silently."""
    ran = []
    monkeypatch.setitem(session.STAGES, "certify", ran.append)
    out = tmp_path / "out"
    assert run_main(session, monkeypatch, capsys, "certify", "--out", str(out), *argv) == message
    assert not ran and not out.exists()
    monkeypatch.setattr("sys.argv", ["gpu_session.py", "certify", "--out", str(out)])
    session.main()  # without the option: the stage runs, with the default skip (None: all)
    assert len(ran) == 1 and ran[0].skip is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "bench.json is missing"),
        ("{not json", "bench.json is not a JSON benchmark"),
        ('{"variants": {"fp32": {"certify": {}}}}', "variant 'fp32' has no certify median rate"),
        ('{"variants": [1]}', "bench.json has no object of variants"),
        (
            '{"variants": {"fp32": {"certify": {"median": 1}, '
            '"certify_first_call_overhead_s": -1}}}',
            "variant 'fp32' has a first-call overhead that is not a number >= 0",
        ),
    ],
)
def test_certify_options_refuse_a_bad_benchmark(
    session, monkeypatch, tmp_path, capsys, text, message
) -> None:
    if text is not None:
        (tmp_path / "bench.json").write_text(text)
    error = run_main(session, monkeypatch, capsys, "certify-options", "--out", str(tmp_path))
    assert message in error and "benchmarks/certify.py --json" in error, error


def test_a_results_file_that_is_not_json_is_refused_first(
    session, monkeypatch, tmp_path, capsys
) -> None:
    ran = []
    monkeypatch.setitem(session.STAGES, "certify", ran.append)
    (tmp_path / "results.json").write_text("[1, 2")
    error = run_main(session, monkeypatch, capsys, "certify", "--out", str(tmp_path))
    assert "results.json is not a JSON object of stage results" in error and not ran


def test_robust_weights_and_attack_records_name_their_method(session, tmp_path) -> None:
    # one robust_state.pt for every method: an attack loaded TRADES weights for --method at
    from argparse import Namespace

    trades, at = (Namespace(out=tmp_path, method=m) for m in ("trades", "at"))
    assert session.robust_state(trades) == tmp_path / "robust_trades_state.pt"
    assert session.robust_state(trades) != session.robust_state(at)


def test_a_certification_stopped_by_its_time_limit_records_what_it_did(
    session, monkeypatch, tmp_path, capsys
) -> None:
    """A time limit's SIGINT makes Lightning exit; the stage used to record nothing at all."""
    import torch
    from lightning.pytorch import Trainer

    torch.save(
        session.noise_model(argparse.Namespace(**NOISE_ARGS)).state_dict(),
        tmp_path / "noise_state.pt",
    )

    def stopped(self, *args, **kwargs):
        raise SystemExit(1)  # what Lightning does on SIGINT

    monkeypatch.setattr(Trainer, "test", stopped)
    monkeypatch.setattr(session, "FastMNIST", lambda *args: None)  # no MNIST files needed
    argv = ["certify", "--out", str(tmp_path), "--accelerator", "cpu", "--tiny", "--compile"]
    monkeypatch.setattr("sys.argv", ["gpu_session.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        session.main()
    assert exit_info.value.code == 1  # not a success: the shell does not take it for one
    (entry,) = json.loads((tmp_path / "results.json").read_text()).values()
    assert entry["interrupted"] is True and entry["new_images"] == 0
    assert entry["mode"]["compile"] is True  # which mode ran is on record
    assert entry["smooth_settings"] is None  # stopped before it built its classifier
    assert "acr" not in entry  # no summary of a certification that did not finish
