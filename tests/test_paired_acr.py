"""benchmarks/paired_acr.py: the paired ACR comparison of a subset TSV with full ones."""

import contextlib
import doctest
import json
import math
import re
from pathlib import Path

import pytest

from robust.certificates import CertifiedImage, read_tsv, write_tsv
from robust.checks import SettingError
from tests.certified_rows import on_lattice

SETTINGS = {"sigma": 0.25, "n0": 100, "n": 100_000, "alpha": 0.001, "num_classes": 10}
"""A sidecar: at these settings no certificate exceeds radius 0.9529."""


def write_certificates(path: Path, rows, **changes) -> Path:
    """A TSV of ``rows`` with its sidecar (``SETTINGS`` with ``changes``).

    The radii are moved onto the sidecar's lattice (:func:`tests.certified_rows.on_lattice`)
    where its settings are valid.
    """
    settings = SETTINGS | changes
    with contextlib.suppress(SettingError):  # a sidecar made invalid on purpose: rows as given
        rows = on_lattice(rows, settings["sigma"], settings["n"], settings["alpha"])
    write_tsv(path, rows)
    Path(f"{path}.json").write_text(json.dumps(settings))
    return path


def test_paired_difference_and_estimate_on_nested_subsets(tmp_path, load_script, capsys):
    paired_acr = load_script("benchmarks/paired_acr.py")
    # the reference certifies all 40 images; the subset model every 2nd one, 0.1 further each
    reference = [CertifiedImage(i, 1, 1, 0.2 + 0.01 * i, 1, 0.0) for i in range(40)]
    subset = [CertifiedImage(i, 1, 1, 0.3 + 0.01 * i, 1, 0.0) for i in range(0, 40, 2)]
    subset[1] = CertifiedImage(2, 1, -1, 0.0, 0, 0.0)  # an abstention counts radius 0
    write_certificates(tmp_path / "ref.tsv", reference)
    write_certificates(tmp_path / "sub.tsv", subset)
    # the radii as written: moved onto the lattice of n = 100,000 (by up to 1e-5)
    reference, subset = (read_tsv(tmp_path / name)[0] for name in ("ref.tsv", "sub.tsv"))
    mine = {row.idx: row for row in subset}
    result = paired_acr.paired(mine, {row.idx: row for row in reference})
    differences = [row.radius * row.correct - reference[row.idx].radius for row in subset]
    assert differences[0] == pytest.approx(0.1, abs=1e-4) and differences[1] < -0.2
    mean = sum(differences) / 20
    assert result["images"] == 20 and result["difference"] == pytest.approx(mean)
    # image 0 is the exact stratum (image 1 is not shared); images 2, 4, ... sample the other 39
    assert result["exact_images"] == 1
    sampled = differences[1:]
    sampled_mean = sum(sampled) / 19
    variance = sum((d - sampled_mean) ** 2 for d in sampled) / 18
    assert result["standard_error"] == pytest.approx(39 / 40 * math.sqrt(variance / 19))
    reference_all = sum(row.radius for row in reference) / 40
    on_all = (differences[0] + 39 * sampled_mean) / 40
    assert result["estimate_all"] == pytest.approx(reference_all + on_all)
    paired_acr.main([str(tmp_path / "sub.tsv"), str(tmp_path / "ref.tsv"), "--every", "2", "4"])
    printed = capsys.readouterr().out
    assert "index % 2 == 0: 20 of sub.tsv" in printed
    assert "index % 4 == 0: 10 of sub.tsv" in printed


def test_a_resumed_prefix_is_weighted_by_its_size_not_counted_k_times(load_script):
    # images 0-20 all certified, then every 5th: the prefix is 21 of the 100 images, not 21 of 36
    paired_acr = load_script("benchmarks/paired_acr.py")
    reference = {i: CertifiedImage(i, 1, 1, 0.5, 1, 0.0) for i in range(100)}
    shared = [*range(20), *range(20, 100, 5)]
    # ours is 0.1 better on the first 20 images and equal on the rest: 0.02 better on all 100
    subset = {i: CertifiedImage(i, 1, 1, 0.6 if i < 20 else 0.5, 1, 0.0) for i in shared}
    result = paired_acr.paired(subset, reference)
    assert result["exact_images"] == 21
    assert result["difference"] == pytest.approx(20 * 0.1 / 36)  # the unweighted mean: biased
    assert result["difference_all"] == pytest.approx(0.02)
    assert result["estimate_all"] == pytest.approx(0.52)
    assert result["standard_error"] == 0.0  # the sampled images all differ by 0


def test_a_subset_that_is_not_every_kth_image_gives_no_estimate_on_all(load_script):
    # an interrupted run of images 0-59 of 100 says nothing of 60-99 (taking the first images as
    # a sample of all printed +0.075 +- 0.007 here, whatever the rest holds)
    paired_acr = load_script("benchmarks/paired_acr.py")
    reference = {i: CertifiedImage(i, 1, 1, 0.5, 1, 0.0) for i in range(100)}
    subset = {i: CertifiedImage(i, 1, 1, 0.6 if i % 2 else 0.55, 1, 0.0) for i in range(60)}
    for shared in (subset, {**subset, 80: CertifiedImage(80, 1, 1, 0.6, 1, 0.0)}):
        result = paired_acr.paired(shared, reference)
        assert result["exact_images"] == 0 and not result["uniform_sample"]
        assert result["difference"] == pytest.approx(0.075, abs=0.003)  # on the shared images
        assert math.isnan(result["estimate_all"]) and math.isnan(result["standard_error"])
    # a first block, then every 2nd image below 500 and every 10th above: 0.1 better below 500
    # and 0.1 worse above, 0 on all; the equal-weight estimate was +0.064 +- 0.009
    reference = {i: CertifiedImage(i, 1, 1, 0.5, 1, 0.0) for i in range(1000)}
    kept = sorted({*range(100), *range(100, 500, 2), *range(500, 1000, 10)})
    denser = {i: CertifiedImage(i, 1, 1, 0.6 if i < 500 else 0.4, 1, 0.0) for i in kept}
    result = paired_acr.paired(denser, reference)
    assert result["exact_images"] == 101 and not result["uniform_sample"]
    assert math.isnan(result["estimate_all"])
    # the same densities on one lattice (every 10th beyond the block) do give the estimate
    even = {i: row for i, row in denser.items() if i < 100 or i % 10 == 0}
    result = paired_acr.paired(even, reference)
    assert result["uniform_sample"] and result["exact_images"] == 101
    # 0-100 exact (+0.1 each); the 89 multiples of 10 from 110 sample the other 899 images
    sampled_mean = (39 * 0.1 - 50 * 0.1) / 89
    assert result["estimate_all"] == pytest.approx(0.5 + (101 * 0.1 + 899 * sampled_mean) / 1000)


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        ([CertifiedImage(1, 1, 1, 0.5, 1, 0.0)], "error: the TSVs share no image"),
        ([CertifiedImage(0, 2, 2, 0.5, 1, 0.0)], "error: image 0 has label 1 in one TSV and 2"),
    ],
)
def test_tsvs_that_cannot_be_paired_are_one_error_line(
    other, expected, tmp_path, load_script, capsys
):
    paired_acr = load_script("benchmarks/paired_acr.py")
    write_certificates(tmp_path / "one.tsv", [CertifiedImage(0, 1, 1, 0.5, 1, 0.0)])
    write_certificates(tmp_path / "two.tsv", other)
    with pytest.raises(SystemExit) as exit_info:
        paired_acr.main([str(tmp_path / "one.tsv"), str(tmp_path / "two.tsv")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    (tmp_path / "two.tsv").write_text("not a tsv\n")
    with pytest.raises(SystemExit) as exit_info:
        paired_acr.main([str(tmp_path / "one.tsv"), str(tmp_path / "two.tsv")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a certification TSV" in err, err


def refusal(paired_acr, capsys, argv: list[str]) -> str:
    """The one ``error:`` line of a refused run (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        paired_acr.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    assert captured.out == ""  # no table printed before the refusal
    return error


def test_empty_selections_are_one_error_line(tmp_path, load_script, capsys):
    paired_acr = load_script("benchmarks/paired_acr.py")
    odd = write_certificates(
        tmp_path / "odd.tsv", [CertifiedImage(i, 1, 1, 0.5, 1, 0.0) for i in (1, 3)]
    )
    full = write_certificates(
        tmp_path / "full.tsv", [CertifiedImage(i, 1, 1, 0.5, 1, 0.0) for i in range(4)]
    )
    empty = write_certificates(tmp_path / "empty.tsv", [])
    for argv, message in (
        ([empty, full], r"empty\.tsv holds no certification rows"),
        ([odd, empty], r"empty\.tsv holds no certification rows"),
        ([odd, full, "--every", "1", "2"], r"--every 2 selects none of the 2 images of odd\.tsv"),
    ):
        error = refusal(paired_acr, capsys, [str(a) for a in argv])
        assert re.search(message, error), error


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        ("radius", r"sub\.tsv: row 2 has radius 99, beyond 0\.9528"),
        ("off lattice", r"sub\.tsv: row 2 has radius 0\.5, which sigma 0\.25, n 100000 and alpha"),
        ("no sidecar", r"sub\.tsv has no settings file"),
        ("empty sidecar", r"sub\.tsv\.json lacks sigma, n, alpha"),
        ("bad alpha", r"sub\.tsv\.json: alpha must be a number in \(0, 1\); got 2"),
    ],
)
def test_rows_are_checked_against_their_sidecar(tmp_path, load_script, capsys, forge, message):
    paired_acr = load_script("benchmarks/paired_acr.py")
    rows = [CertifiedImage(i, 1, 1, 0.5, 1, 0.0) for i in range(4)]
    reference = write_certificates(tmp_path / "ref.tsv", rows)
    subset = write_certificates(tmp_path / "sub.tsv", rows)
    sidecar = Path(f"{subset}.json")
    written = read_tsv(subset)[0]
    if forge == "radius":
        write_tsv(subset, [*written[:2], CertifiedImage(2, 1, 1, 99.0, 1, 0.0)])
    elif forge == "off lattice":  # a radius no count of n = 100,000 gives at sigma 0.25
        write_tsv(subset, [*written[:2], CertifiedImage(2, 1, 1, 0.5, 1, 0.0)])
    elif forge == "no sidecar":
        sidecar.unlink()
    elif forge == "empty sidecar":
        sidecar.write_text("{}")
    else:
        write_certificates(subset, rows, alpha=2)
    error = refusal(paired_acr, capsys, [str(subset), str(reference)])
    assert re.search(message, error), error


def test_docstring_examples(load_script):
    assert doctest.testmod(load_script("benchmarks/paired_acr.py")).failed == 0


def test_files_of_other_test_sets_are_refused_and_other_settings_noted(
    tmp_path, load_script, capsys
):
    # only the labels of shared images used to be compared: another test set with the same labels
    # paired silently, and an n or sigma of its own changed the radii without a word
    paired_acr = load_script("benchmarks/paired_acr.py")
    rows = [CertifiedImage(i, 1, 1, 0.5, 1, 0.0) for i in range(4)]
    mine = write_certificates(tmp_path / "one.tsv", rows, dataset_sha256="a" * 64)
    other = write_certificates(tmp_path / "two.tsv", rows, dataset_sha256="b" * 64)
    with pytest.raises(SystemExit) as exit_info:
        paired_acr.main([str(mine), str(other)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert (
        "certify different test sets (dataset_sha256 aaaaaaaaaaaa... and bbbbbbbbbbbb...)" in error
    )
    fewer = write_certificates(tmp_path / "three.tsv", rows, dataset_sha256="a" * 64, n=10_000)
    paired_acr.main([str(mine), str(fewer)])
    printed = capsys.readouterr().out
    assert "note: three.tsv has n=10000 (one.tsv: 100000)" in printed
    paired_acr.main([str(mine), str(write_certificates(tmp_path / "four.tsv", rows))])
    assert "note:" not in capsys.readouterr().out  # a file without the hash is paired as before
