"""benchmarks/combine_certificates.py: joining the parts of a certification split across machines."""

import doctest
import json
import re
from pathlib import Path

import pytest

from robust.certificates import CertifiedImage, read_settings, read_tsv, write_tsv
from tests.certified_rows import on_lattice

SETTINGS = {
    **{"sigma": 0.25, "seed": 0, "noise_block": 1000, "noise_scheme": "s", "autocast": None},
    **{"n0": 100, "n": 1_000_000, "alpha": 0.001, "model_sha256": "m", "dataset_sha256": "d"},
}
"""A part's sidecar: every defining setting; n large enough to certify radius 1 at sigma 0.25."""


def part(folder: Path, name: str, indices, radius: float = 0.5, **changes) -> Path:
    """A TSV of ``indices`` (all correct at the certifiable radius just above ``radius``)."""
    path = folder / f"{name}.tsv"
    settings = SETTINGS | changes
    rows = [CertifiedImage(i, i % 10, i % 10, radius, 1, 0.1) for i in indices]
    write_tsv(path, on_lattice(rows, settings["sigma"], settings["n"], settings["alpha"]))
    Path(f"{path}.json").write_text(json.dumps(settings))
    return path


@pytest.fixture
def combine(load_script):
    return load_script("benchmarks/combine_certificates.py")


def test_parts_join_into_the_whole_with_their_numerics(tmp_path, combine, capsys):
    gpu = part(
        tmp_path, "gpu", range(0, 6), radius=0.5, tf32=True, gpu="NVIDIA H200", num_classes=10
    )
    cpu = part(
        tmp_path, "cpu", range(6, 10), radius=1.0, tf32=False, device_type="cpu", num_classes=10
    )
    out = tmp_path / "all" / "joined.tsv"
    combine.main([str(gpu), str(cpu), "--images", "10", "--out", str(out)])
    rows, torn = read_tsv(out)
    assert not torn and [r.idx for r in rows] == list(range(10))
    stored = read_settings(Path(f"{out}.json"))
    assert stored["sigma"] == 0.25 and stored["image_range"] == 10
    assert stored["num_classes"] == 10  # the joined rows are checked against it when read back
    assert [(p["images"], p["first"], p["last"], p["tf32"]) for p in stored["parts"]] == [
        (6, 0, 5, True),
        (4, 6, 9, False),
    ]
    printed = capsys.readouterr().out
    # (6 * 0.5 + 4 * 1.0) / 10, with the radii on the lattice of n = 1,000,000 (1.0 -> 1.0008)
    acr = sum(row.radius for row in rows) / 10
    assert acr == pytest.approx(0.7, abs=5e-4) and f"ACR {acr:.4f}" in printed
    assert "100.00 / 100.00 / 100.00 / 40.00 / 40.00" in printed  # r = 0, 0.25, 0.5, 0.75, 1


@pytest.mark.parametrize(
    "second, extra, message",
    [
        (range(6, 10), {"sigma": 0.5}, "certifies something else: sigma=0.25 in"),
        (range(6, 10), {"model_sha256": "other"}, "model_sha256='m' in"),
        (range(6, 10), {"autocast": "bf16"}, "autocast=None in"),
        (range(5, 10), {}, "image 5 is certified in both"),
        (
            range(7, 10),
            {},
            r"miss 1 of the 10 selected images of 0\.\.9 \(every image; first \[6\]\)",
        ),
        (
            range(6, 11),
            {},
            r"hold 1 images that every image of 0\.\.9 does not select \(first \[10\]\)",
        ),
        (range(6, 10), {"skip": 2}, r"select images differently: skip=1 in .*, skip=2 in"),
    ],
)
def test_parts_that_do_not_make_one_certification_are_refused(
    tmp_path, combine, capsys, second, extra, message
):
    first = part(tmp_path, "a", range(0, 6))
    other = part(tmp_path, "b", second, **extra)
    out = tmp_path / "joined.tsv"
    with pytest.raises(SystemExit) as exit_info:
        combine.main([str(first), str(other), "--images", "10", "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert re.search(message, error), error
    assert not out.exists()


def test_a_part_without_its_sidecar_or_given_as_out_is_refused(tmp_path, combine, capsys):
    first = part(tmp_path, "a", range(0, 6))
    bare = tmp_path / "bare.tsv"
    write_tsv(bare, [CertifiedImage(6, 6, 6, 0.5, 1, 0.1)])
    for argv, message in (
        ([str(first), str(bare), "--out", str(tmp_path / "j.tsv")], "settings file"),
        ([str(first), "--out", str(first)], "is one of the parts"),
        ([str(first), "--images", "0", "--out", str(tmp_path / "j.tsv")], "--images"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            combine.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "j.tsv").exists()


def test_docstring_examples(combine):
    assert doctest.testmod(combine).failed == 0


def refusal(combine, capsys, argv: list[str]) -> str:
    """The one ``error:`` line of a refused run (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        combine.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error


def test_an_output_path_that_cannot_be_written_is_refused(tmp_path, combine, capsys):
    first, second = part(tmp_path, "a", range(0, 6)), part(tmp_path, "b", range(6, 10))
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "file").write_text("")
    outs = [(folder, "is a folder"), (tmp_path / "file" / "y.tsv", "is not a folder")]
    if Path("/proc/self").is_dir():  # writable to root by its mode, yet no folder can be made there
        outs.append((Path("/proc/no-such-folder/y.tsv"), "/proc"))
    for out, message in outs:
        error = refusal(combine, capsys, [str(first), str(second), "--out", str(out)])
        assert message in error and str(out) in error, error
    assert sorted(p.name for p in folder.iterdir()) == []  # no <out>.tmp left behind
    assert not list(tmp_path.glob("*.tmp")) and not Path("/proc/no-such-folder").exists()
    error = refusal(combine, capsys, [str(first), "--out", f"{first}.json"])
    assert "settings file of one of the parts" in error


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ({}, r"lacks sigma, n, alpha, seed, noise_block"),
        ({"alpha": None}, r"a\.tsv\.json: alpha must be a number in \(0, 1\); got None"),
        ({"n": 0}, r"n must be an integer in \[1, 1000000000000\]; got 0"),
        ({"sigma": "0.25"}, r"sigma must be a number > 0; got '0\.25'"),
        ({"num_classes": 5}, r"a\.tsv line 7 .*label 5 is not a class in \[0, 5\)"),
        ({"n": 10**400}, r"n must be an integer in \[1, 1000000000000\]"),  # beyond any run
        ({"skip": [1]}, r"a\.tsv: skip must be a positive integer; got \[1\]"),  # unhashable
    ],
)
def test_a_sidecar_without_valid_settings_is_refused(tmp_path, combine, capsys, sidecar, message):
    first, second = part(tmp_path, "a", range(0, 6)), part(tmp_path, "b", range(6, 10))
    Path(f"{first}.json").write_text(json.dumps(SETTINGS | sidecar if sidecar else {}))
    if "skip" in sidecar:
        Path(f"{second}.json").write_text(json.dumps(SETTINGS | sidecar))
    out = tmp_path / "joined.tsv"
    error = refusal(combine, capsys, [str(first), str(second), "--out", str(out)])
    assert re.search(message, error), error
    assert not out.exists() and not Path(f"{out}.json").exists()


def test_a_radius_beyond_what_the_settings_certify_is_refused(tmp_path, combine, capsys):
    """At sigma 0.25, n = 1,000 and alpha 0.001 no certificate exceeds 0.6158: 99 is forged."""
    first = part(tmp_path, "a", range(0, 6), n=1000)
    second = part(tmp_path, "b", range(6, 10), n=1000)
    rows = read_tsv(second)[0]
    write_tsv(second, [*rows[:-1], CertifiedImage(9, 9, 9, 99.0, 1, 0.1)])
    out = tmp_path / "joined.tsv"
    error = refusal(combine, capsys, [str(first), str(second), "--out", str(out)])
    assert re.search(r"b\.tsv: row 9 has radius 99, beyond 0\.6158", error), error
    assert not out.exists()


def test_parts_with_a_gap_are_refused_unless_allowed_and_then_counted(tmp_path, combine, capsys):
    # a dense part stopped at 59 and a sparse one from 80: the joined ACR would weigh them
    # unevenly and hide images 60-79 (it used to join them as "skip 1" and exit 0)
    dense = part(tmp_path, "a", range(0, 60))
    sparse = part(tmp_path, "b", range(80, 100, 5), skip=5)
    out = tmp_path / "joined.tsv"
    with pytest.raises(SystemExit) as exit_info:
        combine.main([str(dense), str(sparse), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "select images differently: skip=1" in capsys.readouterr().err
    gap = part(tmp_path, "c", range(80, 100))
    with pytest.raises(SystemExit) as exit_info:
        combine.main([str(dense), str(gap), "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "miss 20 of the 100 selected images of 0..99 (every image; first [60, 61, 62])" in error
    assert not out.exists()
    combine.main([str(dense), str(gap), "--out", str(out), "--allow-gaps"])
    assert "note: 20 selected images of 0..99 are in no part" in capsys.readouterr().out
    stored = read_settings(Path(f"{out}.json"))
    assert (stored["gaps"], stored["skip"], stored["image_range"]) == (20, 1, 100)
    assert len(read_tsv(out)[0]) == 80


def test_parts_of_every_5th_image_join_with_their_skip(tmp_path, combine, capsys):
    head = part(tmp_path, "a", range(0, 50, 5), skip=5)
    tail = part(tmp_path, "b", range(50, 100, 5), skip=5, first_image=50)
    out = tmp_path / "joined.tsv"
    combine.main([str(head), str(tail), "--out", str(out)])
    stored = read_settings(Path(f"{out}.json"))
    assert (stored["gaps"], stored["skip"], stored["image_range"]) == (0, 5, 96)
    assert [row.idx for row in read_tsv(out)[0]] == list(range(0, 100, 5))
    with pytest.raises(SystemExit):  # one image off the multiples of 5
        combine.main([str(head), str(part(tmp_path, "c", [51], skip=5)), "--out", str(out)])
    assert "that every 5th image of 0..51 does not select (first [51])" in capsys.readouterr().err


def test_parts_of_cpu_and_cuda_are_noted_as_independent_draws(tmp_path, combine, capsys):
    head = part(tmp_path, "a", range(0, 5), device_type="cuda")
    tail = part(tmp_path, "b", range(5, 10), device_type="cpu")
    combine.main([str(head), str(tail), "--out", str(tmp_path / "joined.tsv")])
    assert "note: the parts ran on cpu and cuda, whose generators draw different noise" in (
        capsys.readouterr().out
    )
    same = part(tmp_path, "c", range(5, 10), device_type="cuda")
    combine.main([str(head), str(same), "--out", str(tmp_path / "joined2.tsv")])
    assert "note:" not in capsys.readouterr().out


def test_a_part_can_give_only_a_range_of_its_images(tmp_path, combine, capsys):
    # the CPU went on past the split point while the GPU certified from it: images 6-9 are in both
    cpu = part(tmp_path, "cpu", range(0, 10), radius=1.0, device_type="cpu")
    gpu = part(tmp_path, "gpu", range(6, 10), radius=0.5, device_type="cuda")
    out = tmp_path / "joined.tsv"
    both = [str(gpu), "--images", "10", "--out", str(out)]
    assert "image 6 is certified in both" in refusal(combine, capsys, [str(cpu), *both])
    combine.main([f"{cpu}@0-6", *both])
    rows, _ = read_tsv(out)
    assert [r.idx for r in rows] == list(range(10))
    assert [round(r.radius, 1) for r in rows] == [1.0] * 6 + [0.5] * 4  # the GPU's rows 6-9
    first = read_settings(Path(f"{out}.json"))["parts"][0]
    assert (first["images"], first["range"], first["left_out"]) == (6, [0, 6], 4)
    assert "6 images 0-5 of its images 0-5" in capsys.readouterr().out
    assert "needs A < B" in refusal(combine, capsys, [f"{cpu}@6-6", *both])
    assert "is not a file" in refusal(combine, capsys, [f"{tmp_path}/none.tsv@0-6", *both])
