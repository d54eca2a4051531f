import io
import json
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import compare
from robust.certificates import read_tsv, summarize
from robust.checks import SettingError
from robust.statistics import certifiable_neighbours

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def tiny_settings(tmp_path: Path) -> Path:
    evaluation = {
        "trainer": {
            "callbacks+": [
                {
                    "class_path": "callbacks.PerturbedAccuracy",
                    "init_args": {
                        "attacks": [
                            {"method": "fgm", "norm": "2", "eps": 5.0},
                            {"method": "pgd", "norm": "inf", "eps": 0.3, "steps": 3},
                        ],
                        "max_images": 24,
                        "num_image_grid": 4,
                    },
                },
                {
                    "class_path": "callbacks.Certification",
                    "init_args": {"sigma": 0.25, "n0": 10, "n": 60, "alpha": 0.01, "max_images": 5},
                },
            ]
        }
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    settings = {
        "output_dir": str(tmp_path / "results"),
        "common_args": [
            "--model.init_args.backbone=lightning_modules.backbones.LeNet",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ],
        "trainings": [
            {"name": "standard", "config": str(ROOT / "configs/mnist/standard.yaml")},
            {"name": "adversarial", "config": str(ROOT / "configs/mnist/adversarial.yaml")},
            {
                "name": "noise",
                "config": str(ROOT / "configs/mnist/smoothing.yaml"),
                "args": ["--model.init_args.sigma=0.25"],
            },
        ],
        "evaluation": [str(tmp_path / "eval.yaml")],
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def table_rows(report: str) -> dict[str, dict[str, str]]:
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(header) and cells[0] not in rows:
            rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_compare_end_to_end_report_matches_metrics_and_tsvs(tmp_path, capsys):
    settings = tiny_settings(tmp_path)
    compare.compare(["--config", str(settings)])
    out = tmp_path / "results"
    report = (out / "report.md").read_text()
    rows = table_rows(report)
    assert list(rows)[:3] == ["standard", "adversarial", "noise"]
    log_dirs = {}
    for name in ["standard", "adversarial", "noise"]:
        row = rows[name]
        done = json.loads((out / name / "metrics.json").read_text())
        assert not Path(done["log_dir"]).is_absolute()  # inside the output folder: relative
        metrics, log_dirs[name] = done["metrics"], out / done["log_dir"]
        assert log_dirs[name].parent == out / "tensorboard" / name
        assert float(row["clean acc"]) == pytest.approx(metrics["test/acc"], abs=5e-5)
        for key in ("fgm_l2_eps5", "pgd3_linf_eps0.3"):
            logged = metrics[f"test/perturbed_acc/{key}"]
            assert float(row[f"acc {key}"]) == pytest.approx(logged, abs=5e-5)
        tsv_rows, torn = read_tsv(log_dirs[name] / "certify_test.tsv")
        assert len(tsv_rows) == 5 and not torn
        summary = summarize(tsv_rows, [0.0, 0.25])
        assert row["correct_certified"].startswith(f"{summary['correct_certified']:.0f} of 5 (")
        assert float(row["ACR"]) == pytest.approx(summary["acr"], abs=5e-5)
        assert float(row["ACR"]) == pytest.approx(metrics["certify/acr"], abs=5e-5)
        assert float(row["cert acc @0"]) == pytest.approx(summary["certified_acc@0"], abs=5e-5)
        examples = np.load(log_dirs[name] / "adversarial_examples.npz")
        assert examples["adv/fgm_l2_eps5"].shape == (4, 1, 28, 28)
    for figure in ["certified_accuracy.png", "attack_accuracy.png", "examples_noise.png"]:
        assert (out / figure).stat().st_size > 1000
    assert list((out / "tensorboard" / "comparison").glob("events.out.tfevents.*"))
    assert '"n0": 10' in report  # the settings used are stated
    assert "974 of 10000" in report  # the seed's table is there

    # a second run reuses every finished stage and writes the same report
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("certify_test.tsv")}
    compare.compare(["--config", str(settings)])
    printed = capsys.readouterr().out
    assert len(re.findall(r"reusing trained checkpoint", printed)) == 3
    assert len(re.findall(r"reusing evaluation", printed)) == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("certify_test.tsv")} == before
    assert table_rows((out / "report.md").read_text()) == rows

    # a changed evaluation config is evaluated again into a new log directory (the trained models
    # are still reused), so the old certification file is neither mixed in nor refused
    evaluation = yaml.safe_load((tmp_path / "eval.yaml").read_text())
    evaluation["trainer"]["callbacks+"][1]["init_args"]["max_images"] = 3
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    compare.compare(["--config", str(settings)])
    printed = capsys.readouterr().out
    assert len(re.findall(r"reusing trained checkpoint", printed)) == 3
    assert "reusing evaluation" not in printed
    for name, old in log_dirs.items():
        new = out / json.loads((out / name / "metrics.json").read_text())["log_dir"]
        assert new != old and len(read_tsv(new / "certify_test.tsv")[0]) == 3
        assert len(read_tsv(old / "certify_test.tsv")[0]) == 5  # untouched
    third = table_rows((out / "report.md").read_text())
    assert set(log_dirs) <= set(third)  # every model has its row (all() of nothing is True)
    assert all(
        third[name]["correct_certified"].startswith(("0 of 3", "1 of 3", "2 of 3", "3 of 3"))
        for name in log_dirs
    )

    # a finished evaluation whose certification TSV is gone is evaluated again (its report row
    # used to show no certificates: "0 of 0", ACR nan)
    name = next(iter(log_dirs))
    gone = out / json.loads((out / name / "metrics.json").read_text())["log_dir"]
    (gone / "certify_test.tsv").unlink()
    compare.compare(["--config", str(settings)])
    printed = capsys.readouterr().out
    assert "certify_test.tsv, which the report reads, is gone" in printed
    assert len(re.findall(r"reusing evaluation", printed)) == 2
    assert len(read_tsv(gone / "certify_test.tsv")[0]) == 3
    assert table_rows((out / "report.md").read_text())[name] == third[name]

    # a model retrained into the same checkpoint file is evaluated again (the record was keyed
    # by the file's path only, so the old model's numbers were reported for the new one)
    checkpoint = out / json.loads((out / name / "fit.json").read_text())["ckpt_path"]
    state = torch.load(checkpoint, weights_only=True)
    weights = state["state_dict"]
    first = next(key for key in weights if key.endswith("weight"))
    weights[first] = weights[first] * 0.5
    torch.save(state, checkpoint)
    compare.compare(["--config", str(settings)])
    printed = capsys.readouterr().out
    assert len(re.findall(r"reusing trained checkpoint", printed)) == 3
    assert len(re.findall(r"reusing evaluation", printed)) == 2
    assert f"{name}: attacking and certifying {checkpoint}" in printed
    rows = table_rows((out / "report.md").read_text())

    # a moved output folder is reused from its new place: its records hold paths inside it
    # relative to it (they held absolute paths, so every model trained again)
    moved = tmp_path / "elsewhere" / "results"
    moved.parent.mkdir()
    shutil.move(out, moved)
    config = yaml.safe_load(settings.read_text())
    settings.write_text(yaml.safe_dump({**config, "output_dir": str(moved)}))
    compare.compare(["--config", str(settings)])
    printed = capsys.readouterr().out
    assert len(re.findall(r"reusing trained checkpoint " + re.escape(str(moved)), printed)) == 3
    assert len(re.findall(r"reusing evaluation", printed)) == 3
    assert not out.exists() and table_rows((moved / "report.md").read_text()) == rows


def test_a_recorded_checkpoint_that_is_gone_is_trained_again_with_a_word(
    tmp_path, capsys, monkeypatch
):
    """A deleted checkpoint (or one recorded outside the output folder, which then moved)."""
    settings = compare.parse(["--config", str(tiny_settings(tmp_path))])
    training, out = settings.trainings[0], tmp_path / "results"
    record = {"key": compare.stage_key("digest"), "ckpt_path": str(tmp_path / "gone.ckpt")}
    (out / training.name).mkdir(parents=True)
    (out / training.name / "fit.json").write_text(json.dumps({**record, "train_time_s": 1.0}))

    def training_starts(args):
        raise RuntimeError("training")

    monkeypatch.setattr(compare, "run_cli", training_starts)
    with pytest.raises(RuntimeError, match="training"):
        compare.fit(settings, training, out, "digest")
    printed = capsys.readouterr().out
    assert f"its recorded checkpoint {tmp_path / 'gone.ckpt'} is gone" in printed


def test_a_certification_stopped_early_is_not_recorded_and_resumes(tmp_path, capsys):
    settings = yaml.safe_load(tiny_settings(tmp_path).read_text())
    settings["trainings"] = settings["trainings"][:1]
    settings["eval_args"] = ["--trainer.callbacks.init_args.stop_after=2"]
    path = tmp_path / "stopping.yaml"
    path.write_text(yaml.safe_dump(settings))
    out = tmp_path / "results" / "standard"
    for done in (2, 4):
        with pytest.raises(SettingError, match=f"stopped after {done} of its 5 images"):
            compare.compare(["--config", str(path)])
        assert not (out / "metrics.json").exists()  # not a finished evaluation
    compare.compare(["--config", str(path)])
    printed = capsys.readouterr().out
    assert "reusing trained checkpoint" in printed
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["certify/num_images"] == metrics["certify/selected_images"] == 5


def test_a_certification_with_its_own_output_is_reported_and_reused(tmp_path, capsys):
    settings = yaml.safe_load(tiny_settings(tmp_path).read_text())
    settings["trainings"] = settings["trainings"][:1]
    own = tmp_path / "elsewhere" / "own.tsv"
    evaluation = yaml.safe_load((tmp_path / "eval.yaml").read_text())
    evaluation["trainer"]["callbacks+"][1]["init_args"]["output"] = str(own)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(settings))
    compare.compare(["--config", str(path)])
    out = tmp_path / "results"
    record = json.loads((out / "standard" / "metrics.json").read_text())
    assert record["certificates"] == str(own)
    rows, _ = read_tsv(own)
    summary = summarize(rows, [0.0])
    report_row = table_rows((out / "report.md").read_text())["standard"]  # it showed n/a
    assert float(report_row["ACR"]) == pytest.approx(summary["acr"], abs=5e-5)
    assert report_row["correct_certified"].startswith(f"{summary['correct_certified']:.0f} of 5 (")
    capsys.readouterr()
    compare.compare(["--config", str(path)])  # it was evaluated again on every run
    assert "standard: reusing evaluation" in capsys.readouterr().out


def test_compare_refuses_missing_configs_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.console(
            ["--trainings", '[{"name": "x", "config": "nope.yaml"}]', "--evaluation", "[nope.yaml]"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.yaml" in err[0], err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--nope", "1"], "unrecognized arguments: --nope 1"),
        (
            ["--trainings", '[{"name": "a", "config": "x.yaml", "colour": 1}]'],
            "error: trainings: Option 'colour' is not",  # the key once, not trainings.trainings
        ),
        (["--trainings", "[]"], "trainings: give at least one"),
    ],
)
def test_compare_parse_errors_are_one_line_without_a_usage_page(argv, expected, capsys):
    line = refused(capsys, argv)
    assert expected in line and "robust-compare --help" in line


def test_compare_reports_a_refusal_as_one_error_line(tmp_path, capsys):
    settings = tiny_settings(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        compare.console(
            ["--config", str(settings), "--common_args+=--data.init_args.batch_size=-1"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "batch_size" in err[-1]


@pytest.mark.parametrize("form", ["--config", "-c", "--data="])
def test_a_changed_file_named_in_any_way_changes_the_stage_key(tmp_path, form):
    # only --config files were hashed: -c, --data=file.yaml and files named inside files reused
    # a stale training or evaluation
    extra = tmp_path / "extra.yaml"
    texts = {
        "sigma": ("model: {init_args: {sigma: 0.5}}", "model: {init_args: {sigma: 1.0}}"),
        "data": (
            "class_path: datamodules.EmbeddedMNISTDataModule\ninit_args: {batch_size: 32}",
            "class_path: datamodules.EmbeddedMNISTDataModule\ninit_args: {batch_size: 8}",
        ),
    }["data" if form == "--data=" else "sigma"]
    args = [f"{form}{extra}"] if form.endswith("=") else [form, str(extra)]
    training = {"name": "noise", "config": str(ROOT / "configs/mnist/smoothing.yaml"), "args": args}

    def digests(out: str) -> dict:
        settings = compare.parse(["--trainings", json.dumps([training]), "--output_dir", out])
        return compare.check_stages(settings, Path(out))["noise"]

    extra.write_text(texts[0])
    before = digests(str(tmp_path / "a"))
    assert digests(str(tmp_path / "b")) == before  # where a stage writes is not what it computes
    extra.write_text(texts[1])
    changed = digests(str(tmp_path / "a"))
    assert changed["training"] != before["training"]
    assert changed["evaluation"] != before["evaluation"]
    extra.write_text(texts[0])
    assert digests(str(tmp_path / "a")) == before


def test_two_certifications_writing_one_tsv_are_refused_before_training(tmp_path, capsys):
    quick = str(ROOT / "configs/compare/certify_quick.yaml")
    trainings = [{"name": "a", "config": str(ROOT / "configs/mnist/smoothing.yaml")}]
    argv = ["--trainings", json.dumps(trainings), "--output_dir", str(tmp_path / "out")]
    line = refused(capsys, [*argv, "--evaluation", json.dumps([quick, quick])])
    assert (
        "a (evaluation): two Certification callbacks (<log_dir>/certify_test.tsv, "
        "<log_dir>/certify_test.tsv; an evaluation config listed twice" in line
    )
    assert not (tmp_path / "out").exists()


SIDECAR = {"sigma": 0.25, "n0": 100, "n": 10000, "alpha": 0.001}
R04 = float(certifiable_neighbours([0.4], 0.25, 10_000, 0.001)[1][0])
"""The radius CERTIFY gives just above 0.4 at the settings of ``SIDECAR`` (files read back are
refused when their radii are not ones their settings give)."""


@pytest.mark.parametrize(
    ("radius", "sidecar", "words"),
    [
        (R04, "not json", "is not JSON"),
        (R04, '{"sigma": "x", "n": null, "alpha": 0.001}', "sigma must be a number > 0"),
        (R04, "[1, 2]", "does not hold a JSON object"),
        (R04, None, "has no settings file"),
        (R04, json.dumps({**SIDECAR, "skip": 2.0}), "skip must be a positive integer, got 2.0"),
        (5.0, json.dumps(SIDECAR), "row 0 has radius 5, beyond 0.799644"),  # cannot be certified
        (0.4, json.dumps(SIDECAR), "row 0 has radius 0.4, which sigma 0.25, n 10000 and alpha"),
    ],
)
def test_report_refuses_certificates_it_cannot_check(tmp_path, radius, sidecar, words):
    from robust.certificates import CertifiedImage, write_tsv
    from robust.report import write_report

    log_dir = tmp_path / "run"
    log_dir.mkdir()
    write_tsv(log_dir / "certify_test.tsv", [CertifiedImage(0, 1, 1, radius, 1, 0.0)])
    if sidecar is not None:
        (log_dir / "certify_test.tsv.json").write_text(sidecar)
    metrics = {"test/acc": 0.9}
    with pytest.raises(compare.SettingError, match=re.escape(words)) as info:
        write_report(tmp_path, {"m": {"metrics": metrics, "log_dir": str(log_dir)}}, {})
    assert "certify_test.tsv" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "report.md").exists()
    (log_dir / "certify_test.tsv.json").write_text(json.dumps(SIDECAR))
    write_tsv(log_dir / "certify_test.tsv", [CertifiedImage(0, 1, 1, R04, 1, 0.0)])
    report = write_report(tmp_path, {"m": {"metrics": metrics, "log_dir": str(log_dir)}}, {})
    assert table_rows(report.read_text())["m"]["correct_certified"] == "1 of 1 (100.0%)"


@pytest.mark.parametrize(("misclassified", "flagged"), [(1.0, True), (0.1, True), (0.02, False)])
def test_report_flags_certificates_beyond_what_the_smoothed_attack_leaves(
    tmp_path, capsys, misclassified, flagged
):
    """Certified accuracy at r <= 1 - smoothed_misclassified@r; nothing compared them before."""
    from robust.certificates import CertifiedImage, write_tsv
    from robust.report import write_report

    log_dir = tmp_path / "run"
    log_dir.mkdir()
    rows = [CertifiedImage(i, 1, 1, R04, 1, 0.0) for i in range(200)]  # all certified at 0.4
    write_tsv(log_dir / "certify_test.tsv", rows)
    (log_dir / "certify_test.tsv.json").write_text(json.dumps(SIDECAR))
    metrics = {"test/smoothed_misclassified@0.25": misclassified, "test/smoothed_num_images": 200}
    metrics["test/smoothed_sigma"] = SIDECAR["sigma"]
    report = write_report(tmp_path, {"m": {"metrics": metrics, "log_dir": str(log_dir)}}, {})
    said = "m: certified accuracy 100.0% at radius 0.25, but the attack misclassified"
    assert (said in report.read_text()) == flagged
    assert (said in capsys.readouterr().out) == flagged
    metrics["test/smoothed_sigma"] = 0.5  # another smoothed classifier was attacked: no bound
    report = write_report(tmp_path, {"m": {"metrics": metrics, "log_dir": str(log_dir)}}, {})
    assert said not in report.read_text()


def test_the_bound_is_checked_at_a_sigma_that_float32_metrics_round():
    """sigma 0.12 comes back from Lightning's float32 metrics as 0.11999999731779099."""
    from robust.report import bound_findings

    rows = ([0.3] * 100, [1] * 100)
    logged = float(torch.tensor(0.12))
    metrics = {"test/smoothed_misclassified@0.25": 1.0, "test/smoothed_num_images": 100}
    metrics["test/smoothed_sigma"] = logged
    assert logged != 0.12 and bound_findings({"m": rows}, {"m": metrics}, {"m": 0.12})


def test_report_says_when_only_radius_zero_can_be_certified(tmp_path):
    from robust.certificates import CertifiedImage, write_tsv
    from robust.report import write_report

    log_dir = tmp_path / "run"
    log_dir.mkdir()
    write_tsv(log_dir / "certify_test.tsv", [CertifiedImage(0, 1, -1, 0.0, 0, 0.0)])
    tiny = {**SIDECAR, "n0": 5, "n": 5}  # 5 samples cannot bound pA above 1/2: CERTIFY abstains
    (log_dir / "certify_test.tsv.json").write_text(json.dumps(tiny))
    report = write_report(tmp_path, {"m": {"metrics": {}, "log_dir": str(log_dir)}}, {})
    line = next(x for x in report.read_text().splitlines() if x.startswith("Certification:"))
    assert "(only radius 0 can be certified)" in line and "-0." not in line


def test_report_counts_only_the_latest_runs_images_of_a_resumed_tsv(tmp_path):
    from robust.certificates import CertifiedImage, write_tsv
    from robust.report import write_report

    log_dir = tmp_path / "run"
    log_dir.mkdir()
    # every 2nd image certified, then a run over every 4th resumed the file (sidecar: skip 4)
    rows = [
        CertifiedImage(i, 1, 1 if i % 4 == 0 else 2, R04, int(i % 4 == 0), 0.0)
        for i in range(0, 12, 2)
    ]
    write_tsv(log_dir / "certify_test.tsv", rows)
    sidecar = {"sigma": 0.25, "n0": 100, "n": 10000, "alpha": 0.001, "skip": 4, "max_images": None}
    (log_dir / "certify_test.tsv.json").write_text(json.dumps(sidecar))
    report = write_report(
        tmp_path, {"m": {"metrics": {"test/acc": 0.9}, "log_dir": str(log_dir)}}, {}
    )
    assert table_rows(report.read_text())["m"]["correct_certified"] == "3 of 3 (100.0%)"
    line = next(x for x in report.read_text().splitlines() if x.startswith("Certification:"))
    assert "every 4th test image, 3 images" in line


def test_report_draws_and_links_only_the_figures_of_what_was_evaluated(tmp_path):
    from robust.certificates import CertifiedImage, write_tsv
    from robust.report import write_report

    certified = tmp_path / "certified"
    certified.mkdir()
    write_tsv(certified / "certify_test.tsv", [CertifiedImage(0, 1, 1, R04, 1, 0.0)])
    (certified / "certify_test.tsv.json").write_text(json.dumps(SIDECAR))
    only_certified = {"m": {"metrics": {"test/acc": 0.9}, "log_dir": str(certified)}}
    report = write_report(tmp_path / "a", only_certified, {}).read_text()
    assert "(certified_accuracy.png)" in report and "attack_accuracy" not in report
    assert (tmp_path / "a" / "certified_accuracy.png").is_file()
    assert not (tmp_path / "a" / "attack_accuracy.png").exists()

    attacked = {"test/acc": 0.9, "test/perturbed_acc/pgd40_linf_eps0.3": 0.5}
    report = write_report(tmp_path / "b", {"m": {"metrics": attacked}}, {}).read_text()
    assert "(attack_accuracy.png)" in report and "certified_accuracy" not in report
    assert (tmp_path / "b" / "attack_accuracy.png").is_file()
    assert not (tmp_path / "b" / "certified_accuracy.png").exists()


def refused(capsys, argv: list[str]) -> str:
    """Run robust-compare, expect a refusal, and return its one ``error:`` line."""
    with pytest.raises(SystemExit) as exit_info:
        compare.console(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_the_up_front_check_takes_the_subcommands_own_options(tmp_path):
    settings = compare.parse(["--config", str(tiny_settings(tmp_path))])
    settings.eval_args = ["--verbose=false"]  # an option of `test`, not of the model or data
    compare.check_stages(settings, tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_a_bad_last_evaluation_is_refused_before_any_training(tmp_path, capsys):
    settings = tiny_settings(tmp_path)
    evaluation = yaml.safe_load((tmp_path / "eval.yaml").read_text())
    evaluation["trainer"]["callbacks+"][1]["init_args"]["n0"] = 0
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    line = refused(capsys, ["--config", str(settings)])
    assert line.startswith("error: standard (evaluation): ") and "n0 must be" in line
    assert not (tmp_path / "results").exists()  # nothing trained, nothing written


@pytest.mark.parametrize(
    ("eval_args", "words"),
    [
        (["--eval_args+=--data.init_args.seed=3"], "standard (evaluation): the checkpoint of the "
         "training 'standard' (not yet trained) was trained on other data than the data module "
         "gives (seed 0 there, 3 here)"),
        (["--eval_args+=--model.init_args.backbone=lightning_modules.backbones.SmallCNN"],
         "standard (evaluation): model.init_args.backbone is lightning_modules.backbones.SmallCNN "
         "here but lightning_modules.backbones.LeNet in the checkpoint of the training 'standard'"),
        ([f"--evaluation+={ROOT / 'configs/mnist/standard.yaml'}"],
         "adversarial (evaluation): model class is lightning_modules.standard.StandardClassifier "
         "here but lightning_modules.adversarial.AdversarialClassifier in the checkpoint"),
    ],
)  # fmt: skip
def test_an_evaluation_its_checkpoint_would_refuse_is_refused_before_any_training(
    eval_args, words, tmp_path, capsys
):
    # each was refused by test only after the trainings before it had run
    line = refused(capsys, ["--config", str(tiny_settings(tmp_path)), *eval_args])
    assert line.startswith(f"error: {words}"), line
    assert not (tmp_path / "results").exists()  # nothing trained, nothing written


def test_one_certification_output_for_every_training_is_refused_before_any_training(
    tmp_path, capsys
):
    # the second model was refused (another model's rows) only after it trained, and deleting
    # the TSV, as that refusal advised, made the first model certify again: no end
    settings = tiny_settings(tmp_path)
    evaluation = yaml.safe_load((tmp_path / "eval.yaml").read_text())
    evaluation["trainer"]["callbacks+"][1]["init_args"]["output"] = str(tmp_path / "own.tsv")
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    line = refused(capsys, ["--config", str(settings)])
    assert line.startswith(
        f"error: adversarial (evaluation): Certification output {tmp_path / 'own.tsv'} is also "
        "the TSV of the training 'standard': each model needs its own"
    ), line
    assert not (tmp_path / "results").exists()


def test_two_evaluation_configs_logging_one_metric_are_refused_before_any_training(
    tmp_path, capsys
):
    settings = tiny_settings(tmp_path)
    again = tmp_path / "again.yaml"
    evaluation = yaml.safe_load((tmp_path / "eval.yaml").read_text())
    evaluation["trainer"]["callbacks+"] = evaluation["trainer"]["callbacks+"][:1]  # the attacks
    again.write_text(yaml.safe_dump(evaluation))
    line = refused(capsys, ["--config", str(settings), f"--evaluation+={again}"])
    assert line.startswith(
        "error: standard (evaluation): two evaluation callbacks (PerturbedAccuracy, "
        "PerturbedAccuracy) would both write "
    ), line
    assert not (tmp_path / "results").exists()


def test_a_trainings_own_starting_checkpoint_is_part_of_its_key(tmp_path):
    """A training continued from a checkpoint (its own --ckpt_path) reused the stage without it."""

    def digest(*args: str) -> str:
        training = {"name": "s", "config": str(ROOT / "configs/mnist/standard.yaml"), "args": args}
        out = str(tmp_path / "results")
        settings = compare.parse(["--trainings", json.dumps([training]), "--output_dir", out])
        return compare.check_stages(settings, Path(out))["s"]["training"]

    first, second = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    for path, seed in ((first, "0"), (second, "1")):
        fitted = compare.run_cli(
            ["fit", "--config", str(ROOT / "configs/mnist/standard.yaml"), "--seed_everything",
             seed, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
             "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
             "--trainer.logger.init_args.save_dir", str(tmp_path / f"runs{seed}")]
        )  # fmt: skip
        shutil.copy(fitted.trainer.checkpoint_callback.last_model_path, path)
    plain = digest()
    assert digest(f"--ckpt_path={first}") not in (plain, digest(f"--ckpt_path={second}"))
    shutil.copy(first, tmp_path / "moved.ckpt")  # the weights, not where they lie, count
    assert digest(f"--ckpt_path={tmp_path / 'moved.ckpt'}") == digest(f"--ckpt_path={first}")


def test_a_smoothed_attack_without_sigma_is_refused_before_any_training(tmp_path, capsys):
    """Its check needs the built module (a standard one has no sigma): run up front too."""
    settings = tiny_settings(tmp_path)
    evaluation = yaml.safe_load((tmp_path / "eval.yaml").read_text())
    attack = {"class_path": "callbacks.SmoothedAttack", "init_args": {"max_images": 2}}
    evaluation["trainer"]["callbacks+"].append(attack)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    line = refused(capsys, ["--config", str(settings)])
    assert line.startswith("error: standard (evaluation): SmoothedAttack sigma is not set")
    assert not (tmp_path / "results").exists()  # nothing trained, nothing written


def test_a_bad_optimizer_of_the_last_training_is_refused_before_any_training(tmp_path, capsys):
    settings = tiny_settings(tmp_path)
    config = yaml.safe_load(settings.read_text())
    config["trainings"][-1]["args"] += [
        "--model.init_args.optimizer=torch.optim.SGD",
        "--model.init_args.optimizer.init_args.lr=-1",
    ]
    settings.write_text(yaml.safe_dump(config))
    line = refused(capsys, ["--config", str(settings)])
    assert line.startswith("error: noise (training): model optimizer") and "-1" in line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["a", "a"], "name 'a' is given twice"),
        (["a", "../escape"], "name '../escape' must be a plain folder name"),
        (["a/b"], "name 'a/b' must be a plain folder name"),
        (["a", "comparison"], "name 'comparison' is the report's TensorBoard run"),
        (["report.md"], "name 'report.md' is a file or folder the report writes in output_dir"),
        (["examples_a.png"], "name 'examples_a.png' is a file or folder the report writes"),
        (["tensorboard"], "name 'tensorboard' is a file or folder the report writes"),
    ],
)
def test_training_names_are_distinct_folder_names(names, expected, tmp_path, capsys):
    trainings = [{"name": n, "config": str(ROOT / "configs/mnist/standard.yaml")} for n in names]
    line = refused(capsys, ["--trainings", json.dumps(trainings), "--output_dir", str(tmp_path)])
    assert expected in line


def test_an_output_dir_behind_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    trainings = [{"name": "a", "config": str(ROOT / "configs/mnist/standard.yaml")}]
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        line = refused(capsys, ["--trainings", json.dumps(trainings), "--output_dir", str(out)])
        assert f"output_dir {out} cannot be a folder" in line
    for empty in ("", "  "):  # Path("") is the current folder: a whole comparison written there
        line = refused(capsys, ["--trainings", json.dumps(trainings), "--output_dir", empty])
        assert "output_dir must name a folder; got ''" in line


@pytest.mark.parametrize(
    ("record", "fields"),
    [
        ("not json", {"key": str}),
        ("[1, 2]", {"key": str}),
        ('{"key": 5}', {"key": str}),
        ('{"key": "k"}', {"key": str, "metrics": dict}),
    ],
)
def test_a_malformed_stage_record_is_ignored_not_trusted(record, fields, tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text(record)
    assert compare.read_record(path, fields) is None
    assert f"ignoring {path}" in capsys.readouterr().out
    path.write_text('{"key": "k", "metrics": {}}')
    assert compare.read_record(path, fields) == {"key": "k", "metrics": {}}


@pytest.mark.parametrize(
    ("metrics", "valid"),
    [
        ({"test/acc": 0.9, "certify/acr": 1.7}, True),
        ({"test/acc": 7.5}, False),
        ({"certify/abstain_rate": -0.1}, False),
        ({"certify/acr": float("inf")}, False),
        ({"test/perturbed_acc/pgd": float("nan")}, True),  # an attack on no images
        ({"certify/abstain_rate": 1.5}, False),
        ({"test/acc": "0.9"}, False),
        ({"test/perturbed_num_images/pgd": 500.0}, True),
        ({"test/perturbed_num_images/pgd": float("nan")}, False),
        ({"test/smoothed_num_images": 2.5}, False),
        ({"test/perturbed_num_images/pgd": -1}, False),
        ({"test/perturbed_acc/pgd40_linf_eps0.3": 7.0}, False),  # the report's main columns
        ({"test/perturbed_acc/aa_linf_eps0.3/after_square": -3.0}, False),
        ({"test/perturbation_norm/pgd40_l2_eps2": 1.9}, True),
    ],
)
def test_recorded_metrics_are_checked(metrics, valid):
    assert compare.valid_metrics(metrics) is valid


def hostile_npy_members() -> dict[str, bytes]:
    """Zip members of an examples file that numpy reads as bytes, or would allocate petabytes for."""
    huge = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        huge, {"descr": "<i8", "fortran_order": False, "shape": (10**15,)}
    )
    return {
        "extra": b"hello",  # not an array: numpy returns the bytes
        "pred/x.npy": b"garbage",  # no .npy magic
        "pred/y.npy": huge.getvalue() + bytes(16),  # 7 PiB declared
    }


def test_example_images_files_are_checked_before_use(tmp_path):
    from robust.report import read_examples

    path = tmp_path / "adversarial_examples.npz"
    good = {
        "indices": np.arange(3),
        "labels": np.array([1, 2, 3]),
        "clean": np.zeros((3, 1, 4, 4), np.float32),
        "pred/clean": np.array([1, 2, 0]),
        "adv/fgm": np.ones((3, 1, 4, 4), np.float32),
        "pred/fgm": np.array([0, 2, 0]),
    }
    np.savez(path, **good)
    clean, adversarial, labels, predictions = read_examples(path)
    assert clean.shape == (3, 1, 4, 4)
    assert labels == [1, 2, 3] and predictions["fgm"] == [0, 2, 0] and set(adversarial) == {"fgm"}
    bad = [
        {k: v for k, v in good.items() if k != "clean"},  # no clean images
        {**good, "adv/fgm": np.ones((2, 1, 4, 4), np.float32)},  # a shape that does not fit
        {**good, "pred/fgm": np.array([0, 1])},
        {**good, "labels": np.array(["a", "b", "c"])},  # not numbers
        {k: v for k, v in good.items() if k != "pred/fgm"},  # attacked images without predictions
        {k: v for k, v in good.items() if k != "pred/clean"},
        {**good, "clean": np.zeros((3, 2, 4, 4)), "adv/fgm": np.zeros((3, 2, 4, 4))},  # 2 channels
        {k: v[:0] for k, v in good.items()},  # no image
        {**good, "labels": np.array([1.0, 2.0, 3.0])},  # labels that are not integers
    ]
    for arrays in bad:
        np.savez(path, **arrays)
        assert read_examples(path) is None
    np.savez(path, **{**good, "adv/fgm": np.array([object()] * 3, dtype=object)})
    assert read_examples(path) is None  # a pickle inside is never loaded
    path.write_bytes(b"not a zip")
    assert read_examples(path) is None
    for member, data in hostile_npy_members().items():  # each was a traceback in the report
        np.savez(path, **good)
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(member, data)
        assert read_examples(path) is None, member
    np.savez_compressed(path, **good)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"clean.npy") + 40
    raw[start : start + 30] = b"\xff" * 30  # corrupt deflate data
    path.write_bytes(bytes(raw))
    assert read_examples(path) is None
    many = {k: np.repeat(v, 40, axis=0) for k, v in good.items()}  # 120 images: the first 32 drawn
    np.savez(path, **many)
    clean, adversarial, labels, predictions = read_examples(path)
    assert len(clean) == len(adversarial["fgm"]) == len(labels) == len(predictions["fgm"]) == 32


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_dir_that_cannot_be_created_is_refused_before_any_stage(capsys, monkeypatch):
    checked = []
    monkeypatch.setattr(compare, "check_stages", lambda *args: checked.append(args))
    trainings = [{"name": "a", "config": str(ROOT / "configs/mnist/standard.yaml")}]
    argv = ["--trainings", json.dumps(trainings), "--output_dir", "/proc/robust_x"]
    line = refused(capsys, argv)
    assert "/proc/robust_x" in line and "output_dir" in line
    assert checked == []  # refused before the stages' checks, let alone a training


def test_two_trainings_shown_under_one_label_are_refused():
    # results are keyed by label: the second model's row replaced the first's, exit status 0
    trainings = [
        compare.Training("standard", "a.yaml", label="model"),
        compare.Training("noise", "b.yaml", label="model"),
    ]
    with pytest.raises(compare.SettingError, match="'noise' and 'standard' are both shown as"):
        compare.check_names(trainings)
    compare.check_names([compare.Training("standard", "a.yaml"), trainings[1]])


def test_the_comparison_board_holds_only_this_run_and_each_model_its_own_examples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from robust.report import write_report

    def run_report(labels):
        results = {}
        for label in labels:
            log_dir = tmp_path / "logs" / label.replace("/", "_").replace(" ", "-")
            log_dir.mkdir(parents=True, exist_ok=True)
            np.savez(
                log_dir / "adversarial_examples.npz",
                clean=np.zeros((2, 1, 28, 28), np.float32),
                labels=np.zeros(2, np.int64),
                **{"adv/fgm_l2_eps5": np.zeros((2, 1, 28, 28), np.float32)},
                **{"pred/fgm_l2_eps5": np.zeros(2, np.int64), "pred/clean": np.zeros(2, np.int64)},
            )
            results[label] = {"metrics": {"test/acc": 0.5}, "log_dir": str(log_dir)}
        return write_report(tmp_path / "out", results, {}).read_text()

    run_report(["old"])
    report = run_report(["noise 0.25", "noise/0.25"])
    board = tmp_path / "out" / "tensorboard" / "comparison"
    tags = set()
    for events in board.glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert tags and not any(tag.endswith("/old") for tag in tags)  # the earlier run's model
    # "noise 0.25" and "noise/0.25" used to share examples_noise_0.25.png: one overwrote the other
    linked = re.findall(r"\]\((examples_[^)]+)\)", report)
    assert len(linked) == 2 and len(set(linked)) == 2
    assert all((tmp_path / "out" / name).is_file() for name in linked)


def test_report_names_the_images_of_each_attack_and_model(tmp_path):
    from robust.report import write_report

    key = "pgd40_linf_eps0.3"
    a = {"test/acc": 0.9, f"test/perturbed_acc/{key}": 0.5, f"test/perturbed_num_images/{key}": 500}
    b = {**a, f"test/perturbed_num_images/{key}": 50.0}
    smoothed = {"test/smoothed_robust_acc@0.25": 0.6, "test/smoothed_num_images": 100.0}
    report = write_report(tmp_path, {"a": {"metrics": {**a, **smoothed}}, "b": {"metrics": b}}, {})
    line = next(x for x in report.read_text().splitlines() if x.startswith("Test images per"))
    assert line == f"Test images per attack: {key} on 500 (a), 50 (b); SmoothAdv on g on 100."


def test_an_interrupted_training_resumes_from_its_last_epoch(tmp_path, capsys, monkeypatch):
    from lightning_modules import StandardClassifier

    settings = yaml.safe_load(tiny_settings(tmp_path).read_text())
    settings["trainings"] = settings["trainings"][:1]
    settings["common_args"] = [
        *(a for a in settings["common_args"] if not a.startswith("--trainer.max_epochs")),
        "--trainer.max_epochs=2",
    ]
    path = tmp_path / "two_epochs.yaml"
    path.write_text(yaml.safe_dump(settings))

    def interrupt_in_the_second_epoch(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise RuntimeError("the machine went away")
        return original(self, batch, batch_idx)

    original = StandardClassifier.training_step
    monkeypatch.setattr(StandardClassifier, "training_step", interrupt_in_the_second_epoch)
    with pytest.raises(RuntimeError, match="the machine went away"):
        compare.compare(["--config", str(path)])
    monkeypatch.undo()
    folder = tmp_path / "results" / "standard"
    assert not (folder / "fit.json").exists()
    (last,) = folder.glob("checkpoints/*/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 3  # the first epoch's 3 steps
    # say the first epoch took 50 s: the record adds them (it added the time up to the end of
    # the resumed run, idle gap included, read after that run had rewritten last.ckpt)
    (marker,) = folder.glob("checkpoints/*/started.json")
    began = json.loads(marker.read_text())["started_at"]
    os.utime(last, (began + 50, began + 50))
    capsys.readouterr()
    before = time.perf_counter()
    compare.compare(["--config", str(path)])
    resumed_wall = time.perf_counter() - before
    printed = capsys.readouterr().out
    assert f"standard: resuming the interrupted training from {last}" in printed
    assert "standard: training with" not in printed
    record = json.loads((folder / "fit.json").read_text())
    assert folder.parent / record["resumed_from"] == last
    assert 50 < record["train_time_s"] < 50 + resumed_wall
    assert torch.load(last, weights_only=True)["global_step"] == 6  # one more epoch, not two
    assert not list(folder.glob("checkpoints/*/started.json"))  # finished: never resumed again

    # a finished training whose record is deleted is trained afresh, not "resumed" (its
    # last.ckpt is at max_epochs: Lightning trained nothing and the record named this code)
    (folder / "fit.json").unlink()
    compare.compare(["--config", str(path)])
    printed = capsys.readouterr().out
    assert "resuming" not in printed and "standard: training with" in printed
    record = json.loads((folder / "fit.json").read_text())
    assert record["resumed_from"] is None and (folder.parent / record["ckpt_path"]).is_file()
    assert torch.load(folder.parent / record["ckpt_path"], weights_only=True)["global_step"] in (
        3,
        6,
    )
    # retrained afresh and interrupted in its first epoch: the finished run's last.ckpt in the
    # folder is not this training's, so the next run trains afresh again (it "resumed" from it)
    (folder / "fit.json").unlink()

    def interrupt_at_once(self, batch, batch_idx):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(StandardClassifier, "training_step", interrupt_at_once)
    with pytest.raises(RuntimeError, match="the machine went away"):
        compare.compare(["--config", str(path)])
    monkeypatch.undo()
    capsys.readouterr()
    compare.compare(["--config", str(path)])
    printed = capsys.readouterr().out
    assert "resuming" not in printed and "standard: training with" in printed
    record = json.loads((folder / "fit.json").read_text())
    # its best checkpoint deleted (a FileNotFoundError traceback on every run): trained afresh
    (folder.parent / record["ckpt_path"]).unlink()
    compare.compare(["--config", str(path)])
    assert "standard: training with" in capsys.readouterr().out
    assert (folder.parent / json.loads((folder / "fit.json").read_text())["ckpt_path"]).is_file()

    # a last.ckpt cut short by the interruption: trained afresh, and said so
    shutil.rmtree(tmp_path / "results")
    monkeypatch.setattr(StandardClassifier, "training_step", interrupt_in_the_second_epoch)
    with pytest.raises(RuntimeError, match="the machine went away"):
        compare.compare(["--config", str(path)])
    monkeypatch.undo()
    (last,) = folder.glob("checkpoints/*/last.ckpt")
    last.write_bytes(last.read_bytes()[:1000])
    capsys.readouterr()
    compare.compare(["--config", str(path)])
    printed = capsys.readouterr().out
    assert "standard: cannot resume (ckpt_path" in printed and "training afresh" in printed
    assert json.loads((folder / "fit.json").read_text())["resumed_from"] is None


def certified_log_dir(tmp_path, count: int = 4, **sidecar_changes):
    """A log folder with ``count`` certified rows and their sidecar."""
    from robust.certificates import CertifiedImage, write_tsv

    log_dir = tmp_path / "run"
    log_dir.mkdir()
    rows = [CertifiedImage(i, 1, 1, R04, 1, 0.0) for i in range(count)]
    write_tsv(log_dir / "certify_test.tsv", rows)
    sidecar = {"sigma": 0.25, "n0": 100, "n": 10000, "alpha": 0.001, **sidecar_changes}
    (log_dir / "certify_test.tsv.json").write_text(json.dumps(sidecar))
    return log_dir


@pytest.mark.parametrize("damage", ["torn", "fewer", None])
def test_report_refuses_a_tsv_changed_after_its_certification(tmp_path, damage):
    """A torn last row was dropped, and a TSV of fewer rows than recorded read, without a note."""
    from robust.report import write_report

    log_dir = certified_log_dir(tmp_path)
    tsv = log_dir / "certify_test.tsv"
    if damage == "torn":
        tsv.write_text(tsv.read_text().rstrip("\n"))
    recorded = 3.0 if damage == "fewer" else 4.0
    results = {"m": {"metrics": {"certify/num_images": recorded}, "log_dir": str(log_dir)}}
    if damage is None:
        write_report(tmp_path, results, {})
        return
    problem = "its last line is torn" if damage == "torn" else "holds 4 rows of its selection"
    with pytest.raises(SettingError, match=f"m: {tsv} changed after its certification finished "):
        write_report(tmp_path, results, {})
    with pytest.raises(SettingError, match=problem):
        write_report(tmp_path, results, {})


@pytest.mark.parametrize("edit", ["wrong", "radius", None])
def test_report_refuses_rows_edited_after_their_certification(tmp_path, edit):
    """Rows that still read well but no longer give the logged numbers (the report showed them)."""
    from robust.certificates import CertifiedImage, write_tsv
    from robust.report import write_report

    log_dir = certified_log_dir(tmp_path)
    tsv = log_dir / "certify_test.tsv"
    logged = {"certify/num_images": 4.0, "certify/correct_certified": 4.0, "certify/acr": R04}
    logged |= {"certify/certified_acc@0.25": 1.0, "certify/certified_acc@1.0": 0.0}
    rows = [CertifiedImage(i, 1, 1, R04, 1, 0.0) for i in range(4)]
    if edit == "wrong":  # a certified image made misclassified: a valid row
        rows[2] = CertifiedImage(2, 1, 0, R04, 0, 0.0)
    if edit == "radius":  # another radius its settings can give
        other = float(certifiable_neighbours([0.6], 0.25, 10_000, 0.001)[1][0])
        rows[2] = CertifiedImage(2, 1, 1, other, 1, 0.0)
    write_tsv(tsv, rows)
    results = {"m": {"metrics": logged, "log_dir": str(log_dir)}}
    if edit is None:
        write_report(tmp_path, results, {})
        return
    words = "correct_certified 3" if edit == "wrong" else "ACR"
    with pytest.raises(SettingError, match=f"m: {tsv} changed after its certification .*{words}"):
        write_report(tmp_path, results, {})


def test_a_radius_named_to_six_digits_is_counted_within_its_rounding():
    # certified_acc@0.333333 is logged at the radius 1/3: a row between the two was refused as
    # an edit when the check counted at the name's 0.333333
    from robust.certificates import CertifiedImage
    from robust.report import _check_certified_summary

    rows = [CertifiedImage(0, 1, 1, 0.3333331, 1, 0.0), CertifiedImage(1, 1, 1, 0.5, 1, 0.0)]
    logged = {"certify/certified_acc@0.333333": 0.5}  # counted at 1/3: one of the two
    _check_certified_summary("m", Path("c.tsv"), rows, logged)
    with pytest.raises(SettingError, match=r"certified_acc@0\.333333 1 of 2, logged 0\)"):
        _check_certified_summary("m", Path("c.tsv"), rows, {"certify/certified_acc@0.333333": 0.0})


def test_a_record_from_before_relative_paths_is_found_from_the_working_directory(
    tmp_path, monkeypatch
):
    # with a relative output_dir, the earlier records' log folders were relative to the working
    # directory: read as relative to the output folder, their certification ran again
    monkeypatch.chdir(tmp_path)
    out = Path("results/cmp")
    (out / "tensorboard/noise/test-x").mkdir(parents=True)
    earlier = "results/cmp/tensorboard/noise/test-x"
    assert compare.located(earlier, out) == str(tmp_path / earlier)
    assert compare.located("tensorboard/noise/test-x", out) == str(tmp_path / earlier)
    assert compare.located("tensorboard/gone", out) == str(tmp_path / out / "tensorboard/gone")


def test_report_draws_no_curve_for_a_model_not_certified(tmp_path, monkeypatch):
    from robust import report as report_module

    drawn = {}
    real = report_module.plot_certified_curves

    def spy(curves, **kwargs):
        drawn.update(curves)
        return real(curves, **kwargs)

    monkeypatch.setattr(report_module, "plot_certified_curves", spy)
    log_dir = certified_log_dir(tmp_path)
    results = {
        "certified": {"metrics": {"certify/num_images": 4.0}, "log_dir": str(log_dir)},
        "attacked only": {"metrics": {"test/acc": 0.9}, "log_dir": str(tmp_path / "none")},
    }
    report_module.write_report(tmp_path, results, {})
    assert list(drawn) == ["certified"]


def test_report_names_the_whole_selection_of_a_certification(tmp_path):
    from robust.report import write_report

    log_dir = certified_log_dir(
        tmp_path, count=8, skip=2, first_image=2, max_images=3, image_range=8, dataset_size=20
    )
    report = write_report(tmp_path, {"m": {"metrics": {}, "log_dir": str(log_dir)}}, {})
    line = next(x for x in report.read_text().splitlines() if x.startswith("Certification:"))
    assert "on every 2nd test image from index 2 of the first 8 (at most 3), 3 images" in line
    # the whole test set (or a sidecar that does not say its size) is not named as a range
    for size in (8, None):
        sidecar = log_dir / "certify_test.tsv.json"
        settings = {**json.loads(sidecar.read_text()), "dataset_size": size, "max_images": None}
        sidecar.write_text(json.dumps(settings))
        report = write_report(tmp_path, {"m": {"metrics": {}, "log_dir": str(log_dir)}}, {})
        text = report.read_text()
        assert "on every 2nd test image from index 2, 3 images" in text and "first 8" not in text
