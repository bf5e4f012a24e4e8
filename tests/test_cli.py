"""The commands as a user types them (typer's runner, in process)."""

import json

import pandas as pd
import yaml
from typer.testing import CliRunner

from stainmil.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_full_cli_pipeline_on_a_user_yaml(tiny_cohort, tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "work"),
        "data": {"patches_dir": str(tiny_cohort / "patches"), "labels_csv": str(tiny_cohort / "labels.csv")},
        "features": {"weights": "random", "image_size": 32, "num_workers": 0},
        "model": {"embed_dim": 32, "attention_hidden_dim": 16},
        "train": {"max_epochs": 3},
        "eval": {"bootstrap": 50},
    }))
    r = invoke("index", "--config", config)
    assert r.exit_code == 0, r.output
    assert "files found" in r.output
    r = invoke("split", "--config", config)
    assert r.exit_code == 0 and "data_splits.npz" in r.output, r.output
    r = invoke("extract", "--config", config)
    assert r.exit_code == 0 and "patches/s" in r.output, r.output
    r = invoke("train", "--config", config, "--set", "train.lr=0.001", "--set", "model.attention=gated")
    assert r.exit_code == 0 and "recall_benign" in r.output, r.output
    (run,) = (tmp_path / "work" / "runs").glob("run_*")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.001 and saved["model"]["attention"] == "gated"
    r = invoke("evaluate", run, "--split", "val")
    assert r.exit_code == 0 and "val:" in r.output, r.output
    assert json.loads((run / "metrics.json").read_text())["evaluated_split"] == "val"
    r = invoke("predict", "--checkpoint", run / "checkpoints" / "best.pth", "--config", config,
               "--set", f"output_dir={tmp_path / 'new'}", "--set", "data.labels_csv=")
    assert r.exit_code == 0, r.output
    predictions = pd.read_csv(tmp_path / "new" / "predictions" / "predictions.csv")
    assert len(predictions) == 8 and {"prob_1", "pred", "pred_label", "threshold"} <= set(predictions.columns)


def test_errors_are_one_sentence_and_exit_2(tmp_path):
    r = invoke("index", "--set", f"data.patches_dir={tmp_path / 'nowhere'}")
    assert r.exit_code == 2
    assert "does not exist" in r.output and "Traceback" not in r.output
    r = invoke("index", "--set", "train.lrr=1")
    assert r.exit_code == 2 and "train.lrr" in r.output
    r = invoke("train", "--resume", tmp_path)
    assert r.exit_code == 2 and "not a run folder" in r.output
    r = invoke("evaluate", tmp_path)
    assert r.exit_code == 2 and "best.pth" in r.output


def test_config_reference_and_effective_config():
    r = invoke("config", "--reference")
    assert r.exit_code == 0 and "`data.per_slice_cap`" in r.output
    r = invoke("config", "--set", "train.lr=0.5")
    assert r.exit_code == 0 and yaml.safe_load(r.output)["train"]["lr"] == 0.5


def test_synth_command(tmp_path):
    r = invoke("synth", tmp_path / "c", "--preset", "tiny", "--cases", "4", "--slices", "1-2", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(tmp_path / "c" / "labels.csv")) == 4
    r = invoke("synth", tmp_path / "d", "--slices", "two")
    assert r.exit_code == 2 and "1-15" in r.output


def test_tables_fit_80_columns_pipe_to_grep_and_have_machine_forms():
    import subprocess
    import sys

    from stainmil.features.encoders import ENCODERS

    piped = subprocess.run([sys.executable, "-m", "stainmil", "backbones"], capture_output=True, text=True, check=True)
    lines = piped.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "\x1b[" not in piped.stdout and "…" not in piped.stdout
    assert [line.split()[0] for line in lines if "uni" in line][:2] == ["uni_v1", "uni_v2"]  # `| grep uni`
    assert {line.split()[0] for line in lines[2:]} == set(ENCODERS)                          # every full name
    wide = invoke("backbones", "--wide").output
    assert "licence" in wide and "weights" in wide and max(map(len, wide.splitlines())) > 80
    rows = json.loads(invoke("backbones", "--json").output)
    assert {r["name"] for r in rows} == set(ENCODERS) and "licence" in rows[0]
    assert invoke("backbones", "--markdown").output.startswith("| name | library |")
    models = invoke("models").output.splitlines()
    assert max(map(len, models)) <= 80 and models[2].split()[:2] == ["hierarchical", "yes"]
    assert invoke("backbones", "--markdown", "--json").exit_code != 0


def test_synth_section_mm_writes_scanner_named_real_size_sections(tmp_path):
    """`synth --serial --section-mm`: pyramidal TIFFs named as a scanner export names them, landmarks in µm, a
    slides.yaml whose pattern reads those names; without --serial it says what to add."""
    from stainmil.config import load_config
    from stainmil.data.tiling import compile_slide_pattern

    refused = runner.invoke(app, ["synth", str(tmp_path / "no"), "--section-mm", "1"])
    assert refused.exit_code != 0 and "add --serial" in refused.output
    result = runner.invoke(app, ["synth", str(tmp_path / "real"), "--serial", "--section-mm", "0.6", "--mpp", "1.0"])
    assert result.exit_code == 0, result.output
    slides = sorted(p.name for p in (tmp_path / "real" / "slides").glob("*.tiff"))
    assert slides == [f"C00{c}_{s}_S0.tiff" for c in (1, 2) for s in ("HE", "MelanA", "SOX10")]
    landmarks = pd.read_csv(tmp_path / "real" / "slides" / "C001_SOX10_S0_landmarks.csv")
    assert list(landmarks.columns) == ["id", "x_um", "y_um"] and landmarks[["x_um", "y_um"]].le(600).all().all()
    config = load_config(tmp_path / "real" / "slides.yaml")
    match = compile_slide_pattern(config.tile.filename_pattern).search("C001_MelanA_S0.tiff")
    assert match and config.data.canonical_stain(match["stain"]) == "melan"
    labels = pd.read_csv(tmp_path / "real" / "labels.csv", dtype=str)
    assert list(labels["case_id"]) == ["001", "002"]  # leading zeros, as the file names have them
