"""``wsi-fl labels init``: the labels file for the slides of a manifest that have features, never overwritten."""

from __future__ import annotations

import csv
from pathlib import Path

from wsi_fl.cli import main
from wsi_fl.mil.data import read_labels

MANIFEST = """slide_id,status,n_tiles,seconds,error,source
B-01,ok,120,3.10,,/slides/B-01.svs
B-02,skipped,80,0.20,,/slides/B-02.svs
B-03,empty,0,1.00,no tiles: no tile reaches the minimum tissue fraction (see the QC image),/slides/B-03.svs
B-04,failed,0,0.10,B-04.svs: cannot open as a slide,/slides/B-04.svs
B-05,ok,0,0.90,no tiles: slide 16x16 px is smaller than one tile (224 px at level 0),/slides/B-05.svs
B-06,ok,45,2.00,,/slides/dicom/B-06/1.dcm
"""


def _manifest(tmp_path: Path) -> Path:
    out = tmp_path / "site"
    out.mkdir()
    (out / "manifest.csv").write_text(MANIFEST)
    return out / "manifest.csv"


def test_template_lists_the_slides_with_features_and_is_never_overwritten(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    assert main(["labels", "init", "--manifest", str(manifest)]) == 0
    written = manifest.parent / "labels.csv"
    with written.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["slide_id", "label", "patient_id"]
    # ok and skipped with tiles; not empty, failed, or an old manifest's "ok" with 0 tiles
    assert [(r["slide_id"], r["label"], r["patient_id"]) for r in rows] == [("B-01", "", ""), ("B-02", "", ""),
                                                                            ("B-06", "", "")]
    out = capsys.readouterr().out
    assert f"3 slides with features -> {written}" in out and "left out (no features): B-03 B-04 B-05" in out

    written.write_text("slide_id,label,patient_id\nB-01,1,P1\n")  # filled in by hand
    assert main(["labels", "init", "--manifest", str(manifest)]) == 2
    assert "already exists (--force replaces it)" in capsys.readouterr().err
    assert written.read_text() == "slide_id,label,patient_id\nB-01,1,P1\n"
    assert main(["labels", "init", "--manifest", str(manifest), "--force"]) == 0
    assert written.read_text().count("\n") == 4


def test_from_an_outcome_table_keeps_its_rows_for_the_slides_with_features(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    table = tmp_path / "clinical.csv"
    table.write_text("\ufeffslide_id,label,patient_id,split,note\nB-01,pCR,P1,train,a\nB-03,residual,P2,test,b\n"
                     "B-06,residual,P3,test,c\nB-99,pCR,P4,train,d\n", encoding="utf-8")  # as Excel saves it
    out = tmp_path / "usable.csv"
    assert main(["labels", "init", "--manifest", str(manifest), "--from", str(table), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"2 of 4 labelled slides usable -> {out}" in printed
    assert "left out (no usable features): B-03 B-99" in printed and "with features but no label: B-02" in printed
    labels = read_labels(out)
    assert [(r.slide_id, r.label, r.split) for r in labels.records] == [("B-01", "pCR", "train"),
                                                                         ("B-06", "residual", "test")]
    assert out.read_text().splitlines()[0] == "slide_id,label,patient_id,split,note"


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    not_a_manifest = tmp_path / "labels.csv"
    not_a_manifest.write_text("slide_id,label\na,1\n")
    assert main(["labels", "init", "--manifest", str(not_a_manifest), "--out", str(tmp_path / "x.csv")]) == 2
    assert "not a preprocessing manifest" in capsys.readouterr().err
    manifest = _manifest(tmp_path)
    table = tmp_path / "t.csv"
    table.write_text("id,label\nB-01,1\n")
    assert main(["labels", "init", "--manifest", str(manifest), "--from", str(table)]) == 2
    assert "no slide_id column" in capsys.readouterr().err and not (manifest.parent / "labels.csv").exists()
