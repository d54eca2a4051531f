"""Certification callback: logging inside trainer.test, TSV rows, batch-size and process-count
invariance, resume after an interruption, torn lines, refused settings, summary arithmetic.

Oracles: ``Smooth.certify_batch`` called directly on the same images and indices (the rows must
be exactly its certificates), an uninterrupted run (a resumed run must end with the same rows), a
one-process run (a two-process DDP run must write the same rows), and a hand-computed summary.
"""

import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import TensorDataset

from callbacks import Certification
from callbacks.evaluation import EvaluationCallback
from robust.certificates import (
    HEADER,
    CertifiedImage,
    open_resumable,
    read_settings,
    read_tsv,
    selected_rows,
    summarize,
    write_tsv,
)
from robust.checks import SettingError
from robust.smoothing import ABSTAIN, Smooth
from robust.statistics import largest_certified_radius
from tests.tensor_data import TensorData

ROOT = Path(__file__).resolve().parents[1]
SIGMA = 0.5


class Levels(nn.Module):
    """Predicts the nearest of K grey levels k / (K - 1) from an image's mean pixel."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.flatten(1).mean(1, keepdim=True)
        centers = torch.linspace(0, 1, self.num_classes, device=x.device)
        return -self.scale.abs() * (level - centers) ** 2


class TinyModule(LightningModule):
    def __init__(self, sigma: float = SIGMA) -> None:
        super().__init__()
        self.model = Levels(3)
        self.num_classes = 3
        self.sigma = sigma

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return self.model.scale * 0.0

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def test_step(self, batch, batch_idx):
        self.log("test/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def tiny_images(count: int = 11) -> TensorDataset:
    """4x4 grey images near levels 0, 0.5, 1 (some near a boundary, some mislabelled)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(count) % 3
    levels = labels / 2 + 0.08 * torch.randn(count, generator=generator)
    levels[4] = 0.25  # on the boundary between classes 0 and 1: near 50/50, abstains
    labels[7] = (labels[7] + 1) % 3  # mislabelled: certified but wrong
    images = levels.view(-1, 1, 1, 1) + 0.05 * torch.randn(count, 1, 4, 4, generator=generator)
    return TensorDataset(images, labels)


def TinyData(count: int = 11) -> TensorData:  # noqa: N802 (reads as the data module it is)
    """The tiny images as train, validation and test set, in batches of 4."""
    return TensorData(*tiny_images(count).tensors, batch_size=4)


def certify(tmp_path: Path, module: LightningModule | None = None, **kwargs) -> Certification:
    """Run trainer.test with default Trainer settings and a Certification callback."""
    limits = {k: kwargs.pop(k) for k in ["limit_test_batches"] if k in kwargs}
    settings = {"n0": 20, "n": 200, "alpha": 0.01, "batch_size": 64} | kwargs
    callback = Certification(**settings)
    trainer = Trainer(
        **limits,
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="logs"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(module or TinyModule(), datamodule=TinyData(), verbose=False)
    return callback


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def certificates_only(path: Path) -> list[tuple]:
    """TSV rows without the time column."""
    rows, torn = read_tsv(path)
    assert not torn
    return [(r.idx, r.label, r.predict, r.radius, r.correct) for r in rows]


def test_logged_in_trainer_test_with_files(tmp_path):
    callback = Certification(sigma=SIGMA, n0=20, n=200, alpha=0.01, radii=[0, 0.25, 0.5])
    trainer = Trainer(
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="logs"),
        callbacks=[callback],
        enable_progress_bar=False,
    )
    results = trainer.test(TinyModule(), datamodule=TinyData(), verbose=False)[0]
    expected = {f"certify/certified_acc@{r}" for r in ("0", "0.25", "0.5")}
    expected |= {"certify/acr", "certify/correct_certified", "certify/abstain_rate"}
    assert expected <= results.keys()
    for key, value in callback.summary.items():
        assert results[f"certify/{key}"] == pytest.approx(value)
    tsv = Path(trainer.log_dir) / "certify_test.tsv"
    assert callback.output_path == tsv
    assert lines(tsv)[0] == "\t".join(HEADER)
    assert len(lines(tsv)) == 1 + 11
    rows, _ = read_tsv(tsv)
    assert rows == callback.results  # time included: the file holds what was computed
    assert callback.summary == summarize(rows, [0, 0.25, 0.5])
    assert tsv.with_suffix(".png").stat().st_size > 0
    settings = json.loads(Path(f"{tsv}.json").read_text())
    assert (settings["sigma"], settings["n0"], settings["n"], settings["alpha"]) == (
        SIGMA,
        20,
        200,
        0.01,
    )
    outcomes = {("abstain" if r.predict == ABSTAIN else r.correct) for r in rows}
    assert outcomes == {"abstain", 0, 1}  # the tiny set exercises every kind of row
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "certify/certified_accuracy" in events.Tags()["images"]


def test_rows_are_smooth_certificates(tmp_path):
    module = TinyModule()
    callback = certify(tmp_path, module, sigma=SIGMA, skip=2, max_images=5, seed=3)
    dataset = tiny_images()
    indices = [0, 2, 4, 6, 8]
    images = torch.stack([dataset[i][0] for i in indices])
    smooth = Smooth(module.model, 3, SIGMA, batch_size=50, seed=3)
    direct = smooth.certify_batch(images, indices, n0=20, n=200, alpha=0.01)
    assert [r.idx for r in callback.results] == indices
    for row, cert, i in zip(callback.results, direct, indices, strict=True):
        assert (row.predict, row.radius) == (cert.prediction, cert.radius)
        assert row.label == int(dataset[i][1])
        assert row.correct == int(cert.prediction == row.label)
    assert certificates_only(callback.output_path) == [
        (r.idx, r.label, r.predict, r.radius, r.correct) for r in callback.results
    ]


def test_sigma_defaults_to_the_modules(tmp_path):
    callback = certify(tmp_path / "a", TinyModule(sigma=0.3), max_images=3)
    explicit = certify(tmp_path / "b", TinyModule(sigma=0.3), sigma=0.3, max_images=3)
    assert certificates_only(callback.output_path) == certificates_only(explicit.output_path)
    assert json.loads(Path(f"{callback.output_path}.json").read_text())["sigma"] == 0.3


def test_rows_do_not_depend_on_batch_size(tmp_path):
    small = certify(tmp_path / "small", sigma=SIGMA, batch_size=7)
    large = certify(tmp_path / "large", sigma=SIGMA, batch_size=1000)
    assert certificates_only(small.output_path) == certificates_only(large.output_path)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    whole = certify(tmp_path / "whole", sigma=SIGMA, batch_size=50)
    output = tmp_path / "resumed.tsv"
    first = certify(tmp_path / "a", sigma=SIGMA, batch_size=50, output=str(output), stop_after=4)
    assert len(lines(output)) == 1 + 4
    assert len(first.results) == 4
    kept = read_tsv(output)[0]
    resumed = certify(tmp_path / "b", sigma=SIGMA, batch_size=50, output=str(output))
    final = read_tsv(output)[0]
    assert [r.idx for r in final] == list(range(11))  # dataset order, none missing or repeated
    assert final[:4] == kept  # the first rows were kept (time too), not certified again
    assert certificates_only(output) == certificates_only(whole.output_path)
    assert resumed.summary == whole.summary
    again = certify(tmp_path / "c", sigma=SIGMA, batch_size=50, output=str(output))
    assert read_tsv(output)[0] == final  # nothing left to do: the file is unchanged
    assert again.summary == whole.summary


def test_nested_subsets_resume_one_tsv_and_each_run_reports_its_own(tmp_path):
    output = tmp_path / "nested.tsv"
    every_4th = certify(tmp_path / "a", sigma=SIGMA, output=str(output), skip=4)
    every_2nd = certify(tmp_path / "b", sigma=SIGMA, output=str(output), skip=2)
    assert [r.idx for r in read_tsv(output)[0]] == [0, 2, 4, 6, 8, 10]  # 0, 4, 8 kept
    assert [r.idx for r in every_2nd.results] == [0, 2, 4, 6, 8, 10]
    direct = certify(tmp_path / "c", sigma=SIGMA, skip=2)
    assert every_2nd.summary == direct.summary
    settings = read_settings(Path(f"{output}.json"))
    assert settings["skip"] == 2  # the sidecar says which images the latest run selected
    assert [r.idx for r in selected_rows(read_tsv(output)[0], settings)] == [0, 2, 4, 6, 8, 10]
    again = certify(tmp_path / "d", sigma=SIGMA, output=str(output), skip=4)
    assert again.summary == every_4th.summary  # the rows of every 2nd image are not counted
    assert read_settings(Path(f"{output}.json"))["skip"] == 4
    assert [r.idx for r in selected_rows(read_tsv(output)[0], {"skip": 4})] == [0, 4, 8]
    # a batch limit is part of the selection too: Lightning runs int(3 * 0.5) = 1 of the 3
    # batches of 4 that the 11 images make, so images 0-3 (not half of the images: 0-4)
    half = certify(tmp_path / "e", sigma=SIGMA, output=str(output), skip=2, limit_test_batches=0.5)
    assert [r.idx for r in half.results] == [0, 2]
    stored = read_settings(Path(f"{output}.json"))
    assert (stored["skip"], stored["image_range"]) == (2, 4)
    assert [r.idx for r in selected_rows(read_tsv(output)[0], stored)] == [0, 2]
    assert stored["batch_size"] == 64 and stored["n"] == 200  # the rest: the first run's


def test_a_file_without_rows_starts_afresh_with_this_runs_settings(tmp_path):
    # a run that failed before its first row (say, a fused kernel that did not compile) left a
    # header and its settings: the next run, in another mode, must not inherit them
    output = tmp_path / "empty.tsv"
    settings = {"n": 10, "fused_conv_pool": True}
    assert open_resumable(output, settings, ["n"], num_classes=3, labels=[0, 1]) == []
    assert read_settings(Path(f"{output}.json"))["fused_conv_pool"] is True
    again = {"n": 20, "fused_conv_pool": False}  # even another n: there is nothing to mix
    assert open_resumable(output, again, ["n"], num_classes=3, labels=[0, 1]) == []
    assert read_settings(Path(f"{output}.json")) == again
    write_tsv(output, [CertifiedImage(1, 1, 1, 0.3, 1, 0.0)])
    with pytest.raises(SettingError, match="other settings"):  # with rows: refused as ever
        open_resumable(output, settings, ["n"], num_classes=3, labels=[0, 1])


def test_a_folder_given_as_the_output_is_refused_and_leaves_nothing(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(SettingError, match=r"output .*out is a folder .* e\.g\. .*certify\.tsv"):
        open_resumable(folder, {"n": 10}, ["n"], num_classes=3, labels=[0, 1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no stray settings file


def test_a_resumed_run_records_its_other_speed_settings(tmp_path):
    # the rows' time column is each run's: a run resuming with other speed options adds them
    # (with the rows already there) to the sidecar; the first run's stay as they were
    output = tmp_path / "speed.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), max_images=4)
    assert "resumed_with" not in read_settings(Path(f"{output}.json"))
    certify(tmp_path / "b", sigma=SIGMA, output=str(output), max_images=6, batch_size=32)
    certify(tmp_path / "c", sigma=SIGMA, output=str(output), max_images=8, batch_size=64)
    stored = read_settings(Path(f"{output}.json"))
    assert stored["batch_size"] == 64
    assert stored["resumed_with"] == [{"rows_before": 4, "settings": {"batch_size": 32}}]
    certify(tmp_path / "d", sigma=SIGMA, output=str(output), batch_size=16)
    runs = read_settings(Path(f"{output}.json"))["resumed_with"]
    assert runs[1] == {"rows_before": 8, "settings": {"batch_size": 16}}


class Seen(TinyModule):
    """Counts the images its test loop evaluates."""

    seen = 0

    def test_step(self, batch, batch_idx):
        self.seen += len(batch[0])
        return super().test_step(batch, batch_idx)


@pytest.mark.parametrize(("limit", "images"), [(0.5, 4), (0.34, 4), (0.7, 8), (2, 8), (1.0, 11)])
def test_the_certified_images_are_those_the_test_loop_evaluates(tmp_path, limit, images):
    # 11 images in batches of 4, 4, 3: Lightning runs int(3 * limit) batches for a fraction and
    # min(limit, 3) for a count; the certified images used to be int(11 * limit) (5 for 0.5)
    module = Seen()
    output = tmp_path / "seen.tsv"
    callback = certify(tmp_path, module, output=str(output), limit_test_batches=limit)
    assert module.seen == images
    assert [r.idx for r in callback.results] == list(range(images))
    assert read_settings(Path(f"{output}.json"))["image_range"] == images


@pytest.mark.parametrize("settings", [{"skip": 0}, {"skip": "2"}, {"max_images": 1.5}])
def test_selection_from_a_bad_sidecar_is_refused(settings):
    with pytest.raises(SettingError, match="positive integer"):
        selected_rows([], settings)
    with pytest.raises(SettingError, match="first_image must be an integer >= 0"):
        selected_rows([], {"first_image": -1})


def test_selection_of_a_huge_image_range_is_arithmetic_not_a_set():
    # a sidecar's image_range of 10**15 once built a set of every selected index
    rows = [CertifiedImage(i, 0, 0, 0.1, 1, 0.0) for i in (0, 3, 10, 10**14 + 1)]
    selection = {"image_range": 10**15, "skip": 2, "first_image": 1}
    assert [r.idx for r in selected_rows(rows, selection)] == [10]
    assert [r.idx for r in selected_rows(rows, {**selection, "skip": 1, "max_images": 3})] == [3]


def test_a_run_split_with_first_image_gives_the_whole_runs_rows(tmp_path):
    whole = certify(tmp_path / "whole", sigma=SIGMA, skip=2)
    head = certify(
        tmp_path / "a", sigma=SIGMA, skip=2, output=str(tmp_path / "a.tsv"), stop_after=3
    )
    tail = certify(
        tmp_path / "b", sigma=SIGMA, skip=2, first_image=5, output=str(tmp_path / "b.tsv")
    )
    assert [r.idx for r in head.results] == [0, 2, 4]
    assert [r.idx for r in tail.results] == [6, 8, 10]  # the multiples of skip from 5 on
    split = certificates_only(tmp_path / "a.tsv") + certificates_only(tmp_path / "b.tsv")
    assert split == certificates_only(whole.output_path)
    stored = read_settings(tmp_path / "b.tsv.json")
    assert stored["first_image"] == 5
    assert [r.idx for r in selected_rows(read_tsv(whole.output_path)[0], stored)] == [6, 8, 10]


def ShiftedData() -> TensorData:  # noqa: N802
    """The same labels in the same order, other pixels: what another split seed can look like."""
    images, labels = tiny_images().tensors
    return TensorData(images + 0.01, labels, batch_size=4)


def test_tsv_of_other_images_with_the_same_labels_is_refused(tmp_path):
    output = tmp_path / "other_data.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), stop_after=3)
    before = output.read_text()
    callback = Certification(sigma=SIGMA, n0=20, n=200, alpha=0.01, output=str(output))
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False)
    with pytest.raises(SettingError, match="dataset_sha256="):
        trainer.test(TinyModule(), datamodule=ShiftedData(), verbose=False)
    assert output.read_text() == before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda f: (
                f.__setitem__(4, "1" if f[2] != f[1] else f[4])
                or f.__setitem__(2, str((int(f[1]) + 1) % 3))
            ),
            "correct=1 but predict",
        ),
        (lambda f: f.__setitem__(1, "-2"), "label -2"),
        (lambda f: f.__setitem__(1, "7"), "label 7 is not a class"),
        (lambda f: f.__setitem__(0, "40"), "dataset index 40"),
        (
            lambda f: f.__setitem__(2, "-1") or f.__setitem__(4, "0") or f.__setitem__(3, "0.5"),
            "on an abstention",
        ),
        (lambda f: f.__setitem__(3, "nan"), "radius nan"),
    ],
)
def test_forged_rows_are_refused_naming_the_line(tmp_path, edit, message):
    output = tmp_path / "forged.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), stop_after=4)
    text = output.read_text().splitlines(keepends=True)
    fields = text[2].rstrip("\n").split("\t")
    edit(fields)
    text[2] = "\t".join(fields) + "\n"
    output.write_text("".join(text))
    with pytest.raises(SettingError, match=f"line 3 .*{message}"):
        certify(tmp_path / "b", sigma=SIGMA, output=str(output))
    with pytest.raises(SettingError, match=message):
        read_tsv(output, num_classes=3, indices=range(11))


def test_row_labelled_other_than_the_dataset_is_refused(tmp_path):
    output = tmp_path / "relabelled.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), stop_after=4)
    text = output.read_text().splitlines(keepends=True)
    fields = text[2].rstrip("\n").split("\t")
    label = (int(fields[1]) + 1) % 3  # another class, with a consistent `correct`
    fields[1], fields[4] = str(label), str(int(int(fields[2]) == label))
    text[2] = "\t".join(fields) + "\n"
    output.write_text("".join(text))
    with pytest.raises(SettingError, match=rf"row {fields[0]} has label {label} but the dataset's"):
        certify(tmp_path / "b", sigma=SIGMA, output=str(output))


@pytest.mark.parametrize("radius", ["99.0", "cap"])
def test_row_beyond_the_largest_certifiable_radius_is_refused(tmp_path, radius):
    output = tmp_path / "impossible.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), stop_after=4)
    cap = largest_certified_radius(SIGMA, 200, 0.01)
    rows = read_tsv(output)[0]
    correct = next(r for r in rows if r.correct)
    text = output.read_text().splitlines(keepends=True)
    at = 1 + rows.index(correct)
    fields = text[at].split("\t")
    # just above the cap is refused; the cap itself (all n samples on the top class) is not
    fields[3] = repr(cap) if radius == "cap" else radius
    text[at] = "\t".join(fields)
    output.write_text("".join(text))
    if radius == "cap":
        resumed = certify(tmp_path / "b", sigma=SIGMA, output=str(output))
        assert next(r for r in resumed.results if r.idx == correct.idx).radius == cap
        return
    with pytest.raises(SettingError, match=rf"row {correct.idx} has radius 99, beyond 0\.99988"):
        certify(tmp_path / "b", sigma=SIGMA, output=str(output))


def test_unwritable_output_is_one_clear_error(tmp_path):
    folder = tmp_path / "a_folder.tsv"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"a_folder\.tsv"):
        certify(tmp_path / "a", sigma=SIGMA, output=str(folder))


@pytest.mark.parametrize("cut", ["no_newline", "short_line"])
def test_torn_last_line_is_redone(tmp_path, cut):
    whole = certify(tmp_path / "whole", sigma=SIGMA)
    output = tmp_path / "torn.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), stop_after=6)
    text = output.read_text()
    last = text.splitlines()[-1]
    if cut == "no_newline":
        output.write_text(text[:-4])  # the last row lost its end
    else:
        output.write_text(text[: -len(last) - 1] + "\t".join(last.split("\t")[:3]) + "\n")
    rows, torn = read_tsv(output)
    assert torn and len(rows) == 5
    certify(tmp_path / "b", sigma=SIGMA, output=str(output))
    assert output.read_text().endswith("\n")
    assert certificates_only(output) == certificates_only(whole.output_path)


def test_malformed_middle_line_or_repeated_index_is_an_error(tmp_path):
    output = tmp_path / "bad.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), max_images=4)
    good = lines(output)
    output.write_text("\n".join([good[0], good[1], "garbage", *good[2:]]) + "\n")
    with pytest.raises(ValueError, match="line 3"):
        certify(tmp_path / "b", sigma=SIGMA, output=str(output), max_images=4)
    output.write_text("\n".join([*good, good[1]]) + "\n")
    with pytest.raises(ValueError, match="repeats dataset index 0"):
        certify(tmp_path / "c", sigma=SIGMA, output=str(output), max_images=4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": 300}, "n=200 there, 300 now"),
        ({"n0": 30}, "n0=20 there, 30 now"),
        ({"sigma": 0.25}, "sigma=0.5 there, 0.25 now"),
        ({"alpha": 0.05}, "alpha=0.01 there, 0.05 now"),
        ({"seed": 1}, "seed=0 there, 1 now"),
        ({"noise_block": 7}, "noise_block="),
        ({"autocast": "bf16"}, "autocast=None there, 'bf16' now"),
    ],
)
def test_tsv_from_other_settings_is_refused(tmp_path, change, message):
    output = tmp_path / "runs.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), max_images=2)
    before = output.read_text()
    settings = {"sigma": SIGMA, "output": str(output), "max_images": 2} | change
    with pytest.raises(ValueError, match=message):
        certify(tmp_path / "b", **settings)
    assert output.read_text() == before  # nothing mixed in


def test_tsv_of_another_model_or_without_settings_is_refused(tmp_path):
    output = tmp_path / "runs.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), max_images=2)
    other = TinyModule()
    with torch.no_grad():
        other.model.scale.fill_(2.0)
    with pytest.raises(ValueError, match="model_sha256="):
        certify(tmp_path / "b", other, sigma=SIGMA, output=str(output), max_images=2)
    Path(f"{output}.json").unlink()
    with pytest.raises(SettingError, match="without its settings file"):
        certify(tmp_path / "c", sigma=SIGMA, output=str(output), max_images=2)


class NotedLevels(Levels):
    """Levels with extra state (``get_extra_state``), which its state dict holds as an object."""

    def __init__(self, note: str) -> None:
        super().__init__(3)
        self.note = note

    def get_extra_state(self) -> dict:
        return {"note": self.note}

    def set_extra_state(self, state: dict) -> None:
        self.note = state["note"]


def test_a_model_with_extra_state_is_certified_and_told_from_another(tmp_path):
    output, noted, other = tmp_path / "runs.tsv", TinyModule(), TinyModule()
    noted.model, other.model = NotedLevels("a"), NotedLevels("b")
    callback = certify(tmp_path / "a", noted, sigma=SIGMA, output=str(output), max_images=2)
    assert len(callback.results) == 2  # it failed: 'dict' object has no attribute 'detach'
    with pytest.raises(ValueError, match="model_sha256="):
        certify(tmp_path / "b", other, sigma=SIGMA, output=str(output), max_images=2)


def test_a_failure_in_rank_zeros_work_reaches_every_rank():
    """Rank 0's error is broadcast, so the other ranks raise too instead of waiting for it."""
    sent = []

    def trainer(rank: int) -> SimpleNamespace:
        def broadcast(outcome, src):
            if rank == 0:
                sent.append(outcome)
            return sent[-1]

        return SimpleNamespace(
            is_global_zero=rank == 0, strategy=SimpleNamespace(broadcast=broadcast)
        )

    def defect():
        raise AttributeError("'dict' object has no attribute 'detach'")

    def refusal():
        raise ValueError("output: a folder")

    with pytest.raises(AttributeError, match="detach"):  # a defect keeps its traceback
        EvaluationCallback.on_rank_zero(trainer(0), defect, "Certification")
    with pytest.raises(RuntimeError, match="Certification failed on rank 0: AttributeError"):
        EvaluationCallback.on_rank_zero(trainer(1), defect, "Certification")
    for rank in (0, 1):
        with pytest.raises(SettingError, match="output: a folder"):
            EvaluationCallback.on_rank_zero(trainer(rank), refusal, "Certification")


def test_summary_by_hand():
    rows = [
        CertifiedImage(0, 1, 1, 0.3, 1, 0.0),  # certified correct, radius 0.3
        CertifiedImage(1, 2, 2, 1.25, 1, 0.0),  # certified correct, radius exactly 1.25
        CertifiedImage(2, 0, 3, 0.8, 0, 0.0),  # certified but wrong
        CertifiedImage(3, 4, ABSTAIN, 0.0, 0, 0.0),  # abstained
    ]
    summary = summarize(rows, [0.0, 0.25, 0.5, 1.25, 2.0])
    assert summary["certified_acc@0"] == 0.5
    assert summary["certified_acc@0.25"] == 0.5
    assert summary["certified_acc@0.5"] == 0.25
    assert summary["certified_acc@1.25"] == 0.25  # radius >= r counts
    assert summary["certified_acc@2"] == 0.0
    assert summary["acr"] == pytest.approx((0.3 + 1.25) / 4)
    assert summary["correct_certified"] == 2
    assert summary["abstain_rate"] == 0.25
    assert summary["num_images"] == 4
    assert summarize([], [0.0]) == {}


def test_tsv_line_round_trip_is_exact_and_locuslab_shaped():
    row = CertifiedImage(12, 3, 3, 0.1 + 0.2, 1, 3723.5)
    line = row.to_line()
    assert line == "12\t3\t3\t0.30000000000000004\t1\t1:02:03.500000\n"
    assert CertifiedImage.from_line(line) == row


def test_a_time_no_tsv_line_can_hold_is_refused_when_read():
    # 1e14 s parsed, then overflowed datetime.timedelta when the row was written again
    with pytest.raises(
        ValueError, match=r"time 100000000000000\.0 is not a duration \(0 to 86399999913600 s\)"
    ):
        CertifiedImage.from_line("0\t1\t1\t0.5\t1\t1e14")
    longest = CertifiedImage(0, 1, 1, 0.5, 1, 86_399_999_913_600.0)
    assert CertifiedImage.from_line(longest.to_line()).time == longest.time


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"n0": 0}, "n0"),
        ({"n": 0}, "n "),
        ({"batch_size": 0}, "batch_size"),
        ({"skip": 0}, "skip"),
        ({"max_images": 0}, "max_images"),
        ({"first_image": -1}, "first_image"),
        ({"seed": -1}, "seed"),
        ({"val_n": 0}, "val_n"),
        ({"radii": []}, "radii"),
        ({"autocast": "fp8"}, "autocast"),
        ({"stop_after": -1}, "stop_after"),
        ({"stop_after": 0}, "stop_after must be an integer >= 1"),
        ({"n": 1000 * 1024 + 1}, r"n must be an integer in \[1, 1024000\]; got 1024001 \(at most"),
        ({"n0": 10 * 1024 + 1, "noise_block": 10}, r"n0 must be an integer in \[1, 10240\]"),
        ({"val_n": 2**30, "every_n_val_epochs": 1}, r"val_n must be an integer in \[1, 1024000\]"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=f"Certification {name}"):
        Certification(**kwargs)


def test_too_small_n_warns_with_the_smallest_useful_n():
    with pytest.warns(UserWarning, match="smallest useful n is 10"):
        Certification(sigma=0.25, n=9, alpha=0.001)
    with pytest.warns(UserWarning, match="smallest useful val_n is 5"):
        Certification(sigma=0.25, n=100, alpha=0.05, every_n_val_epochs=1, val_n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Certification(sigma=0.25, n=10, alpha=0.001)


def test_small_n_certifies_nothing_as_warned(tmp_path):
    with pytest.warns(UserWarning, match="smallest useful n"):
        callback = certify(tmp_path, sigma=SIGMA, n=6, alpha=0.01)  # smallest useful: 7
    assert all(row.radius == 0.0 for row in callback.results)
    assert callback.summary["acr"] == 0.0


def test_validation_certification_every_k_epochs(tmp_path):
    calls = []

    class Counting(Certification):
        def run(self, trainer, pl_module, stage):
            calls.append((stage, trainer.current_epoch, trainer.sanity_checking))
            return super().run(trainer, pl_module, stage)

    callback = Counting(sigma=SIGMA, n0=10, n=50, every_n_val_epochs=2, val_n=100)
    trainer = Trainer(
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="logs"),
        callbacks=[callback],
        max_epochs=3,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyModule(), datamodule=TinyData())
    assert calls == [("val", 1, False)]  # the 2nd of 3 epochs; never in the sanity check
    assert "val_certify/acr" in trainer.callback_metrics
    assert "certify/acr" not in trainer.callback_metrics
    assert len(callback.val_results) == 11
    assert not list(Path(trainer.log_dir).glob("*.tsv"))  # validation writes no files


def test_fast_dev_run_certifies_two_images_without_files(tmp_path):
    callback = Certification(sigma=SIGMA, n0=100, n=100_000)
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[callback], fast_dev_run=True)
    results = trainer.test(TinyModule(), datamodule=TinyData(), verbose=False)[0]
    assert results["certify/num_images"] == 2
    assert callback.output_path is None
    assert not list(tmp_path.rglob("*.tsv"))


DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from lightning.pytorch import Trainer
from callbacks import Certification
from tests.test_certification import TinyData, TinyModule

devices, output, stop = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
callback = Certification(sigma=0.5, n0=20, n=200, alpha=0.01, batch_size=30, output=output,
                         stop_after=stop if stop >= 0 else None)
trainer = Trainer(accelerator="cpu", devices=devices, callbacks=[callback],
                  strategy="ddp" if devices > 1 else "auto",
                  logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False)
trainer.test(TinyModule(), datamodule=TinyData(11), verbose=False)
with open(output + f".summary{{trainer.global_rank}}", "w") as file:
    json.dump(callback.summary, file)
"""


def test_two_processes_write_the_rows_of_one(tmp_path):
    """DDP on 2 CPU processes = 1 process, resuming a file that a 1-process run left after 5 images.

    (tests/test_distributed.py runs the real CLI from scratch on 2 processes with unequal shards.)
    """
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT))))
    for devices, name, stop in ((1, "p1", -1), (1, "p2", 5), (2, "p2", -1)):
        subprocess.run(
            [sys.executable, str(script), str(devices), str(tmp_path / f"{name}.tsv"), str(stop)],
            cwd=tmp_path,
            check=True,
            timeout=240,
            capture_output=True,
        )
    assert certificates_only(tmp_path / "p2.tsv") == certificates_only(tmp_path / "p1.tsv")
    assert [r[0] for r in certificates_only(tmp_path / "p2.tsv")] == list(range(11))
    one = json.loads((tmp_path / "p1.tsv.summary0").read_text())
    for rank in (0, 1):  # the same summary on every rank, equal to the one-process run
        assert json.loads((tmp_path / f"p2.tsv.summary{rank}").read_text()) == one
    assert math.isfinite(one["acr"])


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from lightning.pytorch import Trainer
from callbacks import Certification
from tests.test_certification import TinyData, TinyModule

callback = Certification(sigma=0.5, n0=20, n=int(sys.argv[2]), alpha=0.01, batch_size=64,
                         output=sys.argv[1])
trainer = Trainer(accelerator="cpu", callbacks=[callback], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
trainer.test(TinyModule(), datamodule=TinyData(11), verbose=False)
"""


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_a_signal_during_certification_then_the_same_command_resumes(tmp_path, signal_name):
    """A real signal while rows are being written; the rerun ends with an uninterrupted run's rows.

    SIGKILL loses at most the row being written. SIGTERM (``kill PID``, a scheduler's notice) stops
    after the current round with status 143 and says what is kept; Lightning used to note it and
    go on to the last image, exit status 0.
    """
    import signal
    import time

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(root=str(ROOT))))
    n = "40000"
    whole, stopped = tmp_path / "whole.tsv", tmp_path / "stopped.tsv"
    subprocess.run([sys.executable, str(script), str(whole), n], check=True, timeout=600)
    process = subprocess.Popen(
        [sys.executable, str(script), str(stopped), n], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if stopped.is_file() and len(stopped.read_text().splitlines()) >= 3:  # header + 2 rows
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be stopped"
    sent = getattr(signal, signal_name)
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=120)
    written = len(read_tsv(stopped)[0])
    assert 2 <= written < 11
    if sent == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM
        assert (
            f"Certification: stopped by SIGTERM after {written} of 11 test images; {stopped} keeps"
            in stderr
        )
    else:
        assert process.returncode == -signal.SIGKILL
    subprocess.run([sys.executable, str(script), str(stopped), n], check=True, timeout=600)
    assert certificates_only(stopped) == certificates_only(whole)


def test_a_stopped_certification_at_the_default_path_says_how_to_resume_it():
    """The default TSV is in the logger's version_N folder: the same command starts a new one."""
    default, chosen = Certification(sigma=0.5), Certification(sigma=0.5, output="c.tsv")
    for callback in (default, chosen):
        callback._file, callback.output_path = object(), Path("runs/m/version_0/certify_test.tsv")
    assert default.saved_rows_note("test").endswith(
        "to resume from them, run the same command with "
        "--trainer.callbacks.output runs/m/version_0/certify_test.tsv"
    )
    assert chosen.saved_rows_note("test").endswith(
        "keeps every row so far; the same command resumes"
    )


VAL_SIGTERM_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from callbacks import Certification
from tests.test_certification import TinyData, TinyModule

class NoticeDuringValidation(Callback):  # a scheduler's notice while the epoch's validation ends
    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)

class Logged(Callback):
    def on_validation_end(self, trainer, pl_module):
        print("acr", float(trainer.callback_metrics["val_certify/acr"]), flush=True)

out = Path(sys.argv[1])
certification = Certification(sigma=0.5, n0=20, n=2000, alpha=0.01, batch_size=64,
                              every_n_val_epochs=1, val_n=2000)
# the notice comes first: the certification then stops after its first round
callbacks = [NoticeDuringValidation(), certification, Logged(),
             ModelCheckpoint(dirpath=out, save_last=True, monitor="val_certify/acr", mode="max")]
trainer = Trainer(accelerator="cpu", callbacks=callbacks, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, max_epochs=3, num_sanity_val_steps=0)
trainer.fit(TinyModule(), datamodule=TinyData(11))
"""


def test_sigterm_during_validation_certification_keeps_the_epoch_trained(tmp_path):
    """It used to raise inside the validation: the epoch just trained was never checkpointed."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(VAL_SIGTERM_SCRIPT.format(root=str(ROOT))))
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "Certification: stopped by SIGTERM after 1 of 11 val images" in run.stderr, run.stderr
    assert "val_certify/ metrics are NaN; the epoch's checkpoints are saved" in run.stderr
    assert "acr nan" in run.stdout  # not the ACR of the one image certified
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert saved == ["epoch=0-step=3.ckpt", "last.ckpt"], (saved, run.stderr[-2000:])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["epoch"] == 0


def three_epochs(callbacks: list, **settings) -> Trainer:
    """A quiet CPU trainer of 3 epochs without a sanity check, for the signal tests."""
    return Trainer(
        accelerator="cpu", callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=3, num_sanity_val_steps=0, **settings,
    )  # fmt: skip


def test_a_signal_on_another_process_stops_this_one_after_the_epoch_too(tmp_path):
    """Under DDP only the signalled processes stopped; the others trained on and hung."""
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class SignalElsewhere(Callback):  # another process has received SIGTERM; this one has not
        def on_validation_epoch_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                real = trainer.strategy.reduce_boolean_decision

                def any_process(decision, all=True):  # the evaluation's question: any process?
                    asking = sys._getframe(1).f_code.co_name == "stop_on_sigterm"
                    return True if asking else real(decision, all=all)

                trainer.strategy.reduce_boolean_decision = any_process

    certification = Certification(
        sigma=0.5, n0=20, n=200, alpha=0.01, batch_size=64, every_n_val_epochs=1, val_n=200
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = three_epochs([SignalElsewhere(), certification, checkpoint])
    with pytest.raises(SIGTERMException):
        trainer.fit(TinyModule(), datamodule=TinyData(11))
    assert trainer.received_sigterm and trainer.current_epoch == 1  # one epoch of 3 trained
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=3.ckpt", "last.ckpt"]


def stopped_validation_callbacks():
    from callbacks import PerturbedAccuracy, SmoothedAttack
    from robust.attacks import AttackSpec

    every = {"every_n_val_epochs": 1, "batch_size": 2}
    return {
        "certification": (
            Certification(sigma=0.5, n0=20, n=200, alpha=0.01, val_n=200, **every),
            lambda callback: (callback.val_results, callback.val_summary),
        ),
        "perturbed": (
            PerturbedAccuracy([AttackSpec("pgd", "2", 0.5, steps=2)], **every),
            lambda callback: callback.results.get("val"),
        ),
        "smoothed_attack": (
            SmoothedAttack(radii=[0.5], steps=2, num_noise_samples=4, n=100, alpha=0.01, **every),
            lambda callback: callback.results.get("val"),
        ),
    }


@pytest.mark.parametrize("name", ["certification", "perturbed", "smoothed_attack"])
def test_a_validation_stopped_by_sigterm_keeps_no_numbers_of_its_part(name, tmp_path):
    """A stopped validation logged NaN, but the callback kept the part's (or the last) numbers."""
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    callback, kept = stopped_validation_callbacks()[name]
    whole = []

    class SignalAtSecondEpoch(Callback):  # the first validation is whole, the second stopped
        def on_validation_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                whole.append(kept(callback))
                trainer.strategy.reduce_boolean_decision = lambda decision, all=True: True

    trainer = three_epochs([SignalAtSecondEpoch(), callback], enable_checkpointing=False)
    with pytest.raises(SIGTERMException):
        trainer.fit(TinyModule(), datamodule=TinyData(11))
    assert whole[0] not in (None, ([], {}))  # epoch 0's numbers were kept
    assert kept(callback) in (None, ([], {}))  # epoch 1's part's are not, nor epoch 0's


def test_an_output_ending_in_a_slash_and_an_impossible_noise_block_are_refused(tmp_path):
    # the first wrote a file named like the folder; the second was an allocator's traceback
    with pytest.raises(SettingError, match=r"output .*/ names a folder; give the path of a \.tsv"):
        Certification(sigma=SIGMA, output=f"{tmp_path}/new/")
    smooth = Smooth(Levels(3), 3, SIGMA, noise_block=10**13)
    with pytest.raises(SettingError, match=r"noise_block 10000000000000 .* cannot allocate"):
        smooth.certify(tiny_images().tensors[0][0], 10, 100, 0.01, index=0)


def test_an_evaluation_callback_that_evaluates_nothing_in_this_run_says_so(tmp_path):
    trainer = three_epochs(
        [Certification(sigma=SIGMA)], limit_train_batches=1, enable_checkpointing=False
    )
    with pytest.warns(UserWarning, match="Certification evaluates nothing in fit: it runs in test"):
        trainer.fit(TinyModule(), datamodule=TinyData(11))


def test_a_tsv_that_is_not_text_is_refused_naming_it(tmp_path):
    output = tmp_path / "binary.tsv"
    certify(tmp_path / "a", sigma=SIGMA, output=str(output), stop_after=2)
    output.write_bytes(output.read_bytes() + b"\xff\xfe\n")
    with pytest.raises(SettingError, match=rf"{output} is not a certification TSV: it is not UTF"):
        certify(tmp_path / "b", sigma=SIGMA, output=str(output))


def test_a_run_whose_n_certifies_nothing_resumes(tmp_path):
    """With n too small for alpha the largest radius is below 0: its abstentions still resume."""
    output = tmp_path / "tiny_n.tsv"
    with pytest.warns(UserWarning, match="smallest useful n"):
        first = certify(tmp_path / "a", sigma=SIGMA, n=3, output=str(output), stop_after=2)
    assert largest_certified_radius(SIGMA, 3, 0.01) < 0 and len(first.results) == 2
    with pytest.warns(UserWarning, match="smallest useful n"):
        resumed = certify(tmp_path / "b", sigma=SIGMA, n=3, output=str(output))
    assert len(resumed.results) == 11 and all(r.radius == 0.0 for r in resumed.results)


@pytest.mark.parametrize(
    ("kwargs", "limits", "message"),
    [
        ({"first_image": 100_000}, {}, r"11 test images .* first_image must be <= 10, "),
        (
            {"first_image": 11, "skip": 4},
            {},
            r"11 test .* first_image=11, skip=4, .* must be <= 8, ",
        ),
        # the loader's batch limit (4 images) is known only when the test loop starts
        ({"first_image": 5}, {"limit_test_batches": 1}, r"4 test images .* \(of 11 .* <= 3, "),
    ],
)
def test_an_empty_selection_is_refused_before_any_work(tmp_path, kwargs, limits, message):
    with pytest.raises(SettingError, match=r"^Certification selects none of the " + message):
        certify(tmp_path, sigma=SIGMA, **kwargs, **limits)
    assert not list(tmp_path.rglob("*.tsv"))  # no empty TSV, nothing certified


def test_an_empty_selection_of_given_loaders_is_refused_at_test_start(tmp_path):
    from torch.utils.data import DataLoader

    module = TinyModule()
    tested = []
    module.test_step = lambda batch, batch_idx: tested.append(batch_idx)
    callback = Certification(sigma=SIGMA, n0=20, n=200, first_image=11, output=str(tmp_path / "c"))
    trainer = Trainer(
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(SettingError, match=r"first_image=11, skip=1, max_images=None; .* <= 10"):
        trainer.test(module, dataloaders=DataLoader(tiny_images(), batch_size=4), verbose=False)
    assert tested == [] and not (tmp_path / "c").exists()


def test_an_empty_validation_selection_is_refused_before_training(tmp_path):
    module = TinyModule()
    trained = []
    module.training_step = lambda batch, batch_idx: trained.append(batch_idx) or None
    callback = Certification(sigma=SIGMA, n0=20, n=200, every_n_val_epochs=1, first_image=50)
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    with pytest.raises(SettingError, match="selects none of the 11 val images"):
        trainer.fit(module, datamodule=TinyData())
    assert trained == []


def test_unset_sigma_is_refused_at_setup_also_under_fast_dev_run(tmp_path):
    module = TinyModule()
    del module.sigma
    tested = []
    module.test_step = lambda batch, batch_idx: tested.append(batch_idx)
    trainer = Trainer(
        fast_dev_run=True, callbacks=[Certification(n0=20, n=200)], enable_progress_bar=False
    )
    with pytest.raises(SettingError, match="Certification sigma is not set"):
        trainer.test(module, datamodule=TinyData(), verbose=False)
    assert tested == []  # refused before the clean test loop, not after it
