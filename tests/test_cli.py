"""The commands as a user types them (typer's runner, in process)."""

import json
import subprocess
import sys
import typing
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated
from unittest import mock

import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

from stainmil import cli
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
    r = invoke("synth", "patches", "--out", tmp_path / "c", "--preset", "tiny", "--cases", "4", "--slices", "1-2",
               "--seed", "3")
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(tmp_path / "c" / "labels.csv")) == 4 and "deprecated" not in r.output
    assert not (tmp_path / "c" / "slides").exists()
    r = invoke("synth", "patches", "--out", tmp_path / "d", "--slices", "two")
    assert r.exit_code == 2 and "1-15" in r.output
    r = invoke("synth", "patches", "--preset", "tiny")
    assert r.exit_code == 2 and "--out FOLDER" in r.output
    r = invoke("synth", "patches", "--out", tmp_path / "e", "--slide-format", "tiff")  # a slides option
    assert r.exit_code == 2 and "No such option" in r.output
    listing = invoke("synth").output
    assert all(mode in listing for mode in ("patches", "slides", "serial"))


def test_old_one_command_spellings_run_the_mode_they_meant(tmp_path):
    """`synth` and `bench` had their modes behind flags; an old call still runs, with one line naming the new
    spelling."""
    r = invoke("synth", "--out", tmp_path / "c", "--preset", "tiny", "--cases", "2", "--slices", "1-1")
    assert r.exit_code == 0 and (tmp_path / "c" / "labels.csv").is_file(), r.output
    assert deprecations(r) == [f"deprecated: stainmil synth --out {tmp_path / 'c'} --preset tiny --cases 2 --slices "
                               f"1-1; write stainmil synth patches --out {tmp_path / 'c'} --preset tiny --cases 2 "
                               "--slices 1-1 instead (the old form goes in the next release)."]
    assert cli._synth_route(["--out", "x", "--serial", "--section-mm=8", "--mpp", "1"]) == \
        ("serial", ["--out", "x", "--section-mm=8", "--mpp", "1"])
    assert cli._synth_route(["x", "--slides", "svs"]) == ("slides", ["--out", "x", "--slide-format", "svs"])
    assert cli._bench_route(["--preset", "scale", "--scales", "1,10"]) == ("scale", ["--scales", "1,10"])
    assert cli._bench_route(["--preset=scale"]) == ("scale", [])
    assert cli._bench_route(["--feed-only", "--preset", "tiny"]) == ("feed", ["--preset", "tiny"])
    old = ["--preset", "tiny", "--rounds", "1"]
    assert cli._bench_route(old) == ("training", old)
    with mock.patch("stainmil.bench.training.run_bench", return_value={"epoch_s": 1.0}) as bench:
        r = invoke("bench")  # the old bare `stainmil bench`: the demo-preset training figures
    assert r.exit_code == 0 and bench.call_args.args[1] == "demo" and "epoch_s" in r.output
    assert deprecations(r) == ["deprecated: stainmil bench; write stainmil bench training instead (the old form goes "
                               "in the next release)."]
    with mock.patch("stainmil.bench.scale.run_scale", return_value=[]) as scale, \
            mock.patch("stainmil.bench.scale.scale_markdown", return_value="| table |"):
        # the old gpu_check.sh scale step: the one command took --image-size / --rounds and ignored them here
        r = invoke("bench", "--device", "cpu", "--image-size", "32", "--rounds=1", "--preset", "scale", "--scales",
                   "1,3")
    assert r.exit_code == 0 and scale.call_args.args[1] == (1, 3) and "| table |" in r.output
    assert deprecations(r) == ["deprecated: stainmil bench --device cpu --image-size 32 --rounds=1 --preset scale "
                               "--scales 1,3; write stainmil bench scale --device cpu --scales 1,3 (without "
                               "--image-size 32 --rounds=1: scale has no such options) instead (the old form goes in "
                               "the next release)."]
    r = invoke("bench", "trainig")
    assert r.exit_code == 2 and "'trainig' is not a mode of stainmil bench; choose one of training, scale" in r.output
    r = invoke("synth", "patchs", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "'patchs' is not a mode of stainmil synth" in r.output and not (tmp_path / "x").exists()
    r = invoke("bench", "--preset", "scale", "--scales", "one")  # reaches the scale mode's own check
    assert r.exit_code == 2 and "--scales 'one' must be comma-separated integers" in r.output
    assert deprecations(r) == ["deprecated: stainmil bench --preset scale --scales one; write stainmil bench scale "
                               "--scales one instead (the old form goes in the next release)."]


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
    assert "heads, dropout" in invoke("models").output and "Shao et al." in invoke("models", "--wide").output
    assert invoke("backbones", "--markdown", "--json").exit_code != 0


def test_synth_section_mm_writes_scanner_named_real_size_sections(tmp_path):
    """`synth serial`: pyramidal TIFFs named as a scanner export names them, landmarks in µm, a slides.yaml whose
    pattern reads those names."""
    from stainmil.config import load_config
    from stainmil.data.tiling import compile_slide_pattern

    refused = invoke("synth", "serial", "--out", tmp_path / "no", "--section-mm", "1", "--overlap", "1.5")
    assert refused.exit_code != 0 and "--overlap (1.5)" in refused.output
    result = invoke("synth", "serial", "--out", tmp_path / "real", "--section-mm", "0.6", "--mpp", "1.0",
                    "--artefacts")
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


# --- one grammar: an option name means the same thing (type, help) in every command -------------------------

# names whose meaning differs by command on purpose, with the reason; every other name must agree everywhere
DIFFERS_ON_PURPOSE = {
    "--preset": "each command has its own presets (bench adds scale)",
}


def commands(command, prefix=()):
    """(name, click command) of every command and subcommand (`export qupath`)."""
    if hasattr(command, "list_commands"):
        for name in command.list_commands(None):
            yield from commands(command.get_command(None, name), (*prefix, name))
    else:
        yield " ".join(prefix), command


def signature(param) -> tuple:
    """What a user sees of an option: its Python type, flag or value, repeatable or not, and its help text."""
    return (repr(param.type_descriptor.annotation), param.is_flag, param.multiple, param.help)


def shared_aliases(module) -> dict:
    """Option name -> signature of every `...Opt` alias the module defines (the options defined once)."""
    aliases = {}
    for name, value in vars(module).items():
        args = typing.get_args(value)
        if name.endswith("Opt") and len(args) == 2 and isinstance(args[1], typer.models.OptionInfo):
            def probe(option) -> None: ...
            probe.__annotations__ = {"option": value, "return": None}
            one = typer.Typer()
            one.command()(probe)
            (param,) = [p for p in typer.main.get_command(one).params if p.name == "option"]
            aliases[param.opts[0]] = signature(param)
    return aliases


def grammar_problems(app_, aliases: dict, differs_on_purpose=()) -> list[str]:
    """Every way an option's type or help differs between commands, or from its shared alias."""
    uses = defaultdict(dict)
    for command_name, command in commands(typer.main.get_command(app_)):
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:  # hidden: a deprecated old spelling
                for name in (o for o in param.opts if o.startswith("--")):
                    uses[name][command_name] = signature(param)
    problems = []
    for name, by_command in sorted(uses.items()):
        if name in aliases:
            problems += [f"{command}: {name} is {sig}, the shared option is {aliases[name]}"
                         for command, sig in by_command.items() if sig != aliases[name]]
        elif len(set(by_command.values())) > 1 and name not in differs_on_purpose:
            problems.append(f"{name} differs between commands: {by_command}")
    return problems


def test_every_option_means_the_same_in_every_command():
    aliases = shared_aliases(cli)
    assert {"--config", "--set", "--out", "--seeds", "--folds", "--workers", "--resume", "--device"} <= set(aliases)
    assert grammar_problems(app, aliases, DIFFERS_ON_PURPOSE) == []


def test_the_grammar_check_catches_a_command_that_strays():
    stray = typer.Typer()

    @stray.command()
    def good(seeds: cli.SeedsOpt = "", out: cli.OutOpt = None) -> None: ...

    @stray.command()
    def bad(seeds: Annotated[int, typer.Option("--seeds", help="How many seeds.")] = 1,
            out: Annotated[Path | None, typer.Option("--out", help="Where to write.")] = None,
            top: Annotated[int, typer.Option("--top", help="Top k.")] = 1) -> None: ...

    @stray.command()
    def other(top: Annotated[str, typer.Option("--top", help="Top k.")] = "1") -> None: ...

    problems = grammar_problems(stray, shared_aliases(cli))
    assert len(problems) == 3, problems
    assert any(p.startswith("bad: --seeds is (\"<class 'int'>\"") for p in problems)
    assert any(p.startswith("bad: --out") for p in problems) and any(p.startswith("--top differs") for p in problems)


def test_help_imports_none_of_the_library():
    """`import stainmil.cli` and `stainmil --help` load typer, not the config schema, rich's console or the
    numeric stack: the answer comes before anything heavy is imported."""
    code = ("import runpy, sys\n"
            "sys.argv = ['stainmil', '--help']\n"
            "import stainmil.cli\n"
            "early = set(sys.modules)\n"
            "try:\n    runpy.run_module('stainmil', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "heavy = ('torch', 'numpy', 'pandas', 'h5py', 'sklearn', 'matplotlib', 'yaml', 'stainmil.config', "
            "'rich.console')\n"
            "print('import:', *sorted(m for m in heavy if m in early))\n"
            "print('help:', *sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage: stainmil" in out and "compare-models" in out
    assert out.splitlines()[-2:] == ["import:", "help:"], out


# --- old spellings still work for one release, with one deprecation line on stderr ----------------------------

def deprecations(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("deprecated:")]


def test_synth_folder_as_an_argument_still_works(tmp_path):
    r = invoke("synth", tmp_path / "c", "--preset", "tiny", "--cases", "4", "--slices", "1-1")
    assert r.exit_code == 0 and (tmp_path / "c" / "labels.csv").is_file(), r.output
    assert deprecations(r) == [f"deprecated: stainmil synth {tmp_path / 'c'} --preset tiny --cases 4 --slices 1-1; "
                               f"write stainmil synth patches --out {tmp_path / 'c'} --preset tiny --cases 4 --slices "
                               "1-1 instead (the old form goes in the next release)."]


def test_synth_slides_writes_the_cohort_and_its_slides(tmp_path):
    """`synth slides`: TIFF slides by default; --slides is the slide route's flag in demo and bench, so synth's
    old `--slides FORMAT` runs `synth slides --slide-format FORMAT` with a deprecation line."""
    r = invoke("synth", "slides", "--out", tmp_path / "c", "--preset", "tiny", "--cases", "2", "--slices", "1-1")
    assert r.exit_code == 0 and sorted((tmp_path / "c" / "slides").rglob("*.tiff")), r.output
    assert (tmp_path / "c" / "slides.yaml").is_file() and deprecations(r) == []
    r = invoke("synth", "--out", tmp_path / "d", "--preset", "tiny", "--cases", "2", "--slices", "1-1", "--slides",
               "svs")
    assert r.exit_code == 0 and sorted((tmp_path / "d" / "slides").rglob("*.svs")), r.output
    assert len(deprecations(r)) == 1 and "write stainmil synth slides --out" in deprecations(r)[0]
    r = invoke("synth", "slides", "--out", tmp_path / "e", "--slide-format", "png")
    assert r.exit_code == 2 and "--slide-format 'png' is not one of tiff, svs, dicom" in r.output


@pytest.fixture
def called(monkeypatch, tmp_path):
    """Replace the library functions of cv, extract, compare-models and tune: record what the CLI passes."""
    import stainmil.experiments.compare_models as compare_models
    import stainmil.experiments.cv as cv
    import stainmil.experiments.nested as nested
    import stainmil.experiments.seeds as seeds
    import stainmil.experiments.tune as tune
    import stainmil.features.extract as extract

    calls = {}
    report = tmp_path / "experiment"
    for name in ("seeds_report.txt", "nested_report.txt"):
        (report / name).parent.mkdir(exist_ok=True)
        (report / name).write_text("report\n")

    def record(name, result):
        def fake(*args, **kwargs):
            calls[name] = (args, kwargs)
            return result
        return fake

    monkeypatch.setattr(cv, "run_cv", record("run_cv", None))
    monkeypatch.setattr(seeds, "run_cv_seeds", record("run_cv_seeds", (None, report)))
    monkeypatch.setattr(nested, "run_nested_cv", record("run_nested_cv", {"out_dir": str(report)}))
    monkeypatch.setattr(extract, "extract_sharded", record("extract_sharded", []))
    table = pd.DataFrame([{"model": "m", "n_cases": 1, "auc": 1, "auc_ci95": "", "delta_auc": 0, "delta_auc_ci95": ""}])
    monkeypatch.setattr(compare_models, "compare_models", record("compare_models", table))
    monkeypatch.setattr(tune, "run_tune", record("run_tune", SimpleNamespace(n_trials=1, best_value=0.5,
                                                                             best_params={}, out_dir=report)))
    return calls


def test_cv_seeds_is_a_list_and_a_bare_count_still_works(called):
    r = invoke("cv", "--seeds", "3,5,8", "--workers", "2")
    assert r.exit_code == 0 and deprecations(r) == [], r.output
    _, kwargs = called.pop("run_cv_seeds")
    assert kwargs["seeds"] == [3, 5, 8] and kwargs["launch"].workers == 2 and kwargs["launch"].launcher == "local"
    r = invoke("cv", "--seeds", "3", "--set", "train.seed=10")             # the old count: seeds 10, 11, 12
    assert r.exit_code == 0 and called.pop("run_cv_seeds")[1]["seeds"] == [10, 11, 12]
    assert deprecations(r) == ["deprecated: cv --seeds 3 (a count of seeds); write --seeds 10,11,12 instead (the old "
                               "form goes in the next release)."]
    r = invoke("cv", "--seeds", "7,")                                        # one seed: a plain CV with it
    assert r.exit_code == 0 and called.pop("run_cv")[0][0].train.seed == 7 and "run_cv_seeds" not in called
    r = invoke("cv", "--seeds", "1")                                         # the old default: one seed
    assert r.exit_code == 0 and "no --seeds" in deprecations(r)[0] and "run_cv" in called
    for wrong, says in ((("--seeds", "0,x"), "comma-separated integers"), (("--seeds", "0"), "at least 1"),
                        (("--seeds", "1,2", "--tune", "3"), "separate experiments"),
                        (("--tune", "3", "--workers", "2"), "drop --workers"),
                        (("--seeds", "1,2", "--fold-index", "0"), "one fold of a plain CV")):
        r = invoke("cv", *wrong)
        assert r.exit_code == 2 and says in r.output, (wrong, r.output)


def test_fold_and_shard_indices_count_from_0_and_the_old_spellings_still_work(called):
    r = invoke("cv", "--resume", "exp", "--fold-index", "0")
    assert r.exit_code == 0 and deprecations(r) == [] and called.pop("run_cv")[1]["only_fold"] == 0
    r = invoke("cv", "--resume", "exp", "--fold", "1")                      # the old --fold counted from 1
    assert r.exit_code == 0 and called.pop("run_cv")[1]["only_fold"] == 0
    assert deprecations(r) == ["deprecated: --fold 1 (counted from 1); write --fold-index 0 (counted from 0) instead "
                               "(the old form goes in the next release)."]
    assert invoke("cv", "--fold", "1", "--fold-index", "0").exit_code == 2
    r = invoke("extract", "--shards", "4", "--shard-index", "3")
    _, kwargs = called.pop("extract_sharded")
    assert r.exit_code == 0 and deprecations(r) == [] and (kwargs["shards"], kwargs["shard"]) == (4, 3)
    r = invoke("extract", "--shards", "4", "--shard", "3")
    assert r.exit_code == 0 and called.pop("extract_sharded")[1]["shard"] == 3
    assert "--shard-index 3" in deprecations(r)[0]
    r = invoke("extract", "--shards", "4", "--shard", "3", "--shard-index", "2")   # both spellings: refused
    assert r.exit_code == 2 and "--shard is the old spelling of --shard-index; give only --shard-index" in r.output


def test_resume_works_wherever_a_command_can_resume(called, tmp_path):
    r = invoke("compare-models", "--seeds", "0,1", "--workers", "2", "--out", tmp_path / "new")
    assert r.exit_code == 0, r.output
    _, kwargs = called.pop("compare_models")
    assert kwargs["seeds"] == [0, 1] and kwargs["out_dir"] == tmp_path / "new" and kwargs["launch"].workers == 2
    r = invoke("compare-models", "--resume", tmp_path / "new")
    assert r.exit_code == 2 and "not a comparison folder" in r.output
    (tmp_path / "new" / "splits").mkdir(parents=True)
    r = invoke("compare-models", "--resume", tmp_path / "new")
    assert r.exit_code == 0 and called.pop("compare_models")[1]["out_dir"] == tmp_path / "new"
    assert invoke("compare-models", "--resume", tmp_path / "new", "--out", tmp_path / "x").exit_code == 2
    study = tmp_path / "moved_study"
    r = invoke("tune", "--resume", study)
    assert r.exit_code == 2 and "not a tune folder" in r.output
    r = invoke("config", "--set", "tune.trials=3")
    study.mkdir()
    (study / "config.yaml").write_text(r.output)
    r = invoke("tune", "--resume", study, "--trials", "2")
    assert r.exit_code == 0, r.output
    (config,), kwargs = called.pop("run_tune")
    assert config.tune.dir == str(study) and config.tune.trials == 3 and kwargs["trials"] == 2


def test_slurm_script_writes_into_the_out_folder_and_a_file_name_still_works(tmp_path):
    r = invoke("slurm-script", "extract", "--out", tmp_path / "slurm", "--shards", "3")
    assert r.exit_code == 0 and deprecations(r) == [], r.output
    script = (tmp_path / "slurm" / "stainmil-extract.sbatch").read_text()
    assert "--shards 3 --shard-index $SLURM_ARRAY_TASK_ID" in script and "#SBATCH --array=0-2" in script
    assert (tmp_path / "slurm" / "stainmil-extract.yaml").is_file()
    r = invoke("slurm-script", "extract", "--out", tmp_path / "old.sbatch")
    assert r.exit_code == 0 and (tmp_path / "old.sbatch").is_file()
    assert deprecations(r) == [f"deprecated: --out {tmp_path / 'old.sbatch'} (the script's file name); write --out "
                               f"{tmp_path} (a folder; the script is named stainmil-extract.sbatch) instead (the "
                               "old form goes in the next release)."]
