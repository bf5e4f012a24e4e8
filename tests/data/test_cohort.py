import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stainmil.config import load_config
from stainmil.data import cohort as C
from stainmil.data.cohort import build_index, report_text, write_index
from stainmil.errors import ConfigError, DataError
from tests.conftest import synth_patches

PATTERN = r"^(?P<case>[^-]*)-(?P<stain>[^-]+)-s(?P<slice>\d+)-(?P<patch>\d+)\.(?:png|jpg)$"


def _png(path, size=32, mode="RGB", color=(200, 120, 150)):
    path.parent.mkdir(parents=True, exist_ok=True)
    value = color if mode in ("RGB",) else (color + (255,) if mode == "RGBA" else color[0])
    Image.new(mode, (size, size), value).save(path)


def _faulty_cohort(root):
    """A folder with every fault the index must report (other naming scheme, other label words)."""
    p = root / "my patches ü"  # spaces and non-ASCII
    for case in ("A1", "A2"):
        for stain in ("HE", "MelanA", "SOX10"):
            for i in range(3):
                _png(p / case / f"{case}-{stain}-s0-{i}.png")
    _png(p / "B3" / "B3-HE-s0-0.png")                         # case B3: only H&E -> missing stains
    _png(p / "B3" / "B3-H&E-s1-0.png", mode="L")              # grayscale, used and converted
    _png(p / "B3" / "B3-HE-s1-1.png", mode="RGBA")            # RGBA, used and converted
    _png(p / "B3" / "B3-HE-s1-2.png", size=48)                # unexpected size, used and reported
    (p / "B3" / "B3-HE-s2-0.png").write_bytes(b"")            # zero bytes; slice 2 has no usable patch
    good = p / "A1" / "A1-HE-s0-0.png"
    (p / "B3" / "B3-HE-s2-1.png").write_bytes(good.read_bytes()[:60])  # truncated
    (p / "B3" / "B3-HE-s2-2.png").write_text("not an image")           # not an image
    from PIL import Image

    Image.new("1", (12000, 12000)).save(p / "B3" / "B3-HE-s3-0.png")     # a decompression bomb: never decoded
    (p / "notes.txt").write_text("hello")                                # name does not match
    _png(p / "Z9" / "Z9-HE-s0-0.png")                          # case without label
    _png(p / "C4" / "C4-HE-s0-0.png")                          # conflicting duplicate labels
    _png(p / "D5" / "D5-HE-s0-0.png")                          # unknown label word
    _png(p / "E6" / "E6-PAS-s0-0.png")                         # unknown stain
    _png(p / "x" / "-HE-s0-0.png")                             # blank case id in the name
    _png(p / "X91" / "X91-HE-s0-0.png")                        # excluded case
    labels = pd.DataFrame({
        "Patient": ["A1", "A2", "B3", "C4", "C4", "D5", "", "NOPATCH", "X91"],
        "Grade": ["Benign", "High Grade", "High Grade", "Benign", "High Grade", "Atypical", "Benign", "Benign",
                  "Benign"],
    })
    labels.to_csv(root / "grades.csv", index=False)
    files = [f for f in p.rglob("*") if f.is_file()]
    return p, root / "grades.csv", len(files)


@pytest.fixture
def faulty(tmp_path):
    patches, labels, n_files = _faulty_cohort(tmp_path)
    config = load_config(None, [
        f"output_dir={tmp_path / 'out'}", f"data.patches_dir={patches}", f"data.labels_csv={labels}",
        f"data.filename_pattern={PATTERN}", "data.case_column=Patient", "data.label_column=Grade",
        "data.label_values={Benign: 0, High Grade: 1}", "data.exclude_cases=[X91]", "data.index_workers=1",
    ])
    return config, n_files


def test_every_fault_is_reported_and_counts_add_up(faulty):
    config, n_files = faulty
    result = build_index(config)
    report = result.report
    assert report["files_total"] == n_files
    assert report["files_used"] + report["files_skipped"] == n_files
    skipped = {reason: set(entry["files"]) for reason, entry in report["skipped"].items()}
    assert skipped[C.NO_MATCH] == {"notes.txt"}
    assert skipped[C.EMPTY] == {"B3/B3-HE-s2-0.png"}
    assert skipped[C.UNREADABLE] == {"B3/B3-HE-s2-1.png", "B3/B3-HE-s2-2.png"}
    assert skipped[C.TOO_LARGE] == {"B3/B3-HE-s3-0.png"}
    assert skipped[C.NO_LABEL] == {"Z9/Z9-HE-s0-0.png"}
    assert skipped[C.CONFLICT] == {"C4/C4-HE-s0-0.png"}
    assert skipped[C.UNKNOWN_WORD] == {"D5/D5-HE-s0-0.png"}
    assert skipped[C.UNKNOWN_STAIN + " ('PAS')"] == {"E6/E6-PAS-s0-0.png"}
    assert skipped[C.BLANK_CASE] == {"x/-HE-s0-0.png"}
    assert skipped[C.EXCLUDED] == {"X91/X91-HE-s0-0.png"}
    assert report["converted_to_rgb"] == {"L": 1, "RGBA": 1}
    assert report["converted_to_rgb_files"] == {"L": ["B3/B3-H&E-s1-0.png"], "RGBA": ["B3/B3-HE-s1-1.png"]}
    text = C.report_text(report)
    assert "1 L (B3-H&E-s1-0.png)" in text and "1 RGBA (B3-HE-s1-1.png)" in text
    assert report["unexpected_size"]["files"] == ["B3/B3-HE-s1-2.png"]
    assert report["labelled_cases_without_patches"] == ["NOPATCH"]
    assert report["conflicting_labels"] == {"C4": ["Benign", "High Grade"]}
    assert report["unknown_label_words"] == {"D5": "Atypical"}
    assert report["blank_case_rows"] == [7]
    assert report["cases_missing_stains"] == {"B3": ["melan", "sox10"]}
    assert report["slices_without_usable_patches"] == [["B3", "he", "2"], ["B3", "he", "3"]]
    assert report["cases_used"] == 3
    manifest = result.manifest
    assert set(manifest["case"]) == {"A1", "A2", "B3"}
    assert set(manifest["stain"]) == {"he", "melan", "sox10"}
    assert dict(manifest.drop_duplicates("case").set_index("case")["label"]) == {"A1": 0, "A2": 1, "B3": 1}
    text = report_text(report)
    for name in ("notes.txt", "B3-HE-s2-0.png", "B3-HE-s2-1.png", "Z9-HE-s0-0.png", "NOPATCH", "Atypical"):
        assert name in text


def test_write_index_outputs(faulty, tmp_path):
    config, _ = faulty
    out = write_index(build_index(config), config)
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == json.loads((out / "index_report.json").read_text())["files_used"]
    assert (out / "index_report.txt").read_text().startswith("stainmil index report")
    assert (out / "config.yaml").is_file()
    assert not list(out.glob("*.tmp"))


def test_synthetic_cohort_indexes_cleanly(tiny_cohort, tmp_path):
    config = load_config(tiny_cohort / "cohort.yaml", [f"output_dir={tmp_path}"])
    result = build_index(config)
    assert result.report["files_skipped"] == 0
    assert len(result.manifest) == len(synth_patches(tiny_cohort))
    assert (result.manifest["x"] >= 0).all() and (result.manifest["y"] >= 0).all()
    first = result.manifest.groupby(["case", "stain", "slice"])["patch_index"].apply(lambda s: list(s) == sorted(s))
    assert first.all()


def test_missing_label_column_is_fatal(faulty):
    config, _ = faulty
    config = config.with_overrides({"data.label_column": "Diagnosis"})
    with pytest.raises(DataError, match="no column 'Diagnosis'"):
        build_index(config)


def test_no_usable_case_is_fatal(faulty):
    config, _ = faulty
    config = config.with_overrides({"data.filename_pattern": r"(?P<case>nomatch)(?P<stain>x)(?P<slice>x)(?P<patch>x)"})
    with pytest.raises(DataError, match="no usable patch"):
        build_index(config)


def test_pattern_without_groups_is_refused(faulty):
    config, _ = faulty
    config = config.with_overrides({"data.filename_pattern": r"(?P<case>\w+)\.png"})
    with pytest.raises(ConfigError, match="stain"):
        build_index(config)


def test_missing_folder_is_one_sentence(tmp_path):
    config = load_config(None, [f"data.patches_dir={tmp_path / 'missing'}"])
    with pytest.raises(DataError, match="does not exist"):
        build_index(config)


def test_unlabelled_index_for_prediction(faulty):
    config, _ = faulty
    result = build_index(config, require_labels=False)
    assert (result.manifest["label"] == -1).all()
    assert {"Z9", "C4", "D5"} <= set(result.manifest["case"])


def test_numeric_case_ids_lose_leading_zeros(tmp_path):
    _png(tmp_path / "p" / "007-he-s0-1.png")
    pd.DataFrame({"case_id": [7], "label": ["benign"]}).to_csv(tmp_path / "l.csv", index=False)
    config = load_config(None, [f"data.patches_dir={tmp_path / 'p'}", f"data.labels_csv={tmp_path / 'l.csv'}",
                                f"data.filename_pattern={PATTERN}"])
    assert list(build_index(config).manifest["case"]) == ["7"]
    assert np.all(build_index(config).manifest["label"] == 0)


def test_a_lean_index_holds_the_same_rows_without_a_python_object_a_cell(prepared):
    """What a bounded training process reads: only its columns, text in Arrow buffers (its memory does not grow
    with an object per patch id), every value as in the full index."""
    from stainmil.data.cohort import load_manifest
    from stainmil.train.run import TRAINING_COLUMNS

    full, lean = load_manifest(prepared), load_manifest(prepared, TRAINING_COLUMNS + ["no_such_column"])
    assert list(lean.columns) == TRAINING_COLUMNS and lean.select_dtypes(include="object").empty
    assert str(lean["patch"].dtype).startswith("string") and lean["label"].dtype == full["label"].dtype
    pd.testing.assert_frame_equal(lean.astype(str), full[TRAINING_COLUMNS].astype(str))


@pytest.mark.parametrize("encoding", ["utf-8-sig", "cp1252"])
def test_labels_as_excel_saves_them(tmp_path, encoding):
    """Excel's byte-order mark (or Windows-1252), semicolons, spaces around names, ids with leading zeros in one
    file and not the other, a duplicated row, a conflicting one."""
    from stainmil.config import DataConfig
    from stainmil.data.labels import read_labels

    text = ("Case ;Grade \r\n007 ;Bénin\r\n8;High Grade \r\n008;High Grade\r\n0042;Bénin\r\n42;High Grade\r\n"
            "  ;Bénin\r\n")
    path = tmp_path / "labels.csv"
    path.write_bytes(text.encode(encoding))
    config = DataConfig(labels_csv=str(path), case_column="Case", label_column="Grade",
                        label_values={"Bénin": 0, "High Grade": 1})
    labels = read_labels(config)
    assert labels.by_case == {"7": 0, "8": 1}
    assert labels.conflicting == {"42": ["Bénin", "High Grade"]} and labels.blank_case_rows == [6]
