"""benchmarks/paired_acr.py: the paired ACR comparison of a subset TSV with full ones."""

import math

import pytest

from robust.certificates import CertifiedImage, write_tsv


def test_paired_difference_and_estimate_on_nested_subsets(tmp_path, load_script, capsys):
    paired_acr = load_script("benchmarks/paired_acr.py")
    # the reference certifies all 40 images; the subset model every 2nd one, 0.1 further each
    reference = [CertifiedImage(i, 1, 1, 0.2 + 0.01 * i, 1, 0.0) for i in range(40)]
    subset = [CertifiedImage(i, 1, 1, 0.3 + 0.01 * i, 1, 0.0) for i in range(0, 40, 2)]
    subset[1] = CertifiedImage(2, 1, -1, 0.0, 0, 0.0)  # an abstention counts radius 0
    write_tsv(tmp_path / "ref.tsv", reference)
    write_tsv(tmp_path / "sub.tsv", subset)
    mine = {row.idx: row for row in subset}
    result = paired_acr.paired(mine, {row.idx: row for row in reference})
    differences = [0.1] * 20
    differences[1] = -(0.2 + 0.02)
    mean = sum(differences) / 20
    assert result["images"] == 20 and result["difference"] == pytest.approx(mean)
    variance = sum((d - mean) ** 2 for d in differences) / 19
    assert result["standard_error"] == pytest.approx(math.sqrt(variance / 20))
    reference_all = sum(0.2 + 0.01 * i for i in range(40)) / 40
    assert result["estimate_all"] == pytest.approx(reference_all + mean)
    paired_acr.main([str(tmp_path / "sub.tsv"), str(tmp_path / "ref.tsv"), "--every", "2", "4"])
    printed = capsys.readouterr().out
    assert "index % 2 == 0: 20 of sub.tsv" in printed
    assert "index % 4 == 0: 10 of sub.tsv" in printed


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
    write_tsv(tmp_path / "one.tsv", [CertifiedImage(0, 1, 1, 0.5, 1, 0.0)])
    write_tsv(tmp_path / "two.tsv", other)
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
