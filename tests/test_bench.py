import pytest
import torch

from stainmil.model import nested_reference as reference
from tests.model.test_hierarchical import model_for, random_bags


@pytest.mark.parametrize("attention,identity", [("tanh", "none"), ("gated", "none"), ("tanh", "embedding")])
def test_vectorised_forward_equals_the_old_nested_loops(attention, identity):
    bags = random_bags(n_cases=8)
    model = model_for(bags, attention, stain_identity=identity).double().eval()
    batch = bags.batch(bags.case_ids)
    batch.features = batch.features.double()
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, reference.nested_forward(model, batch), atol=1e-10)


def test_bench_times_the_trainers_own_epoch(monkeypatch, tmp_path):
    """`stainmil bench`'s epoch figure is the trainer's run_epoch (not a second loop that skips slice choice,
    dropout and prefetch): replaced here, the bench calls the replacement with the run's plan."""
    import numpy as np

    from stainmil.bench.training import training_epoch
    from stainmil.config import Config
    from stainmil.train import trainer

    bags = random_bags(n_cases=4)
    config = Config()
    config = config.with_overrides({"train.patch_dropout": 0.25, "train.cases_per_batch": 2})
    model = model_for(bags, "tanh")
    calls = []
    real = trainer.run_epoch

    def spy(plan, epoch, rng):
        calls.append((plan.config.train.patch_dropout, plan.config.train.cases_per_batch, sorted(plan.cases)))
        return real(plan, epoch, rng)

    monkeypatch.setattr(trainer, "run_epoch", spy)
    seconds = training_epoch(model, torch.optim.Adam(model.parameters()), bags, bags.case_ids,
                             np.random.default_rng(0), None, torch.device("cpu"), config)
    assert seconds > 0 and calls == [(0.25, 2, sorted(bags.case_ids))]


@pytest.fixture(scope="session")
def gpu_check(tmp_path_factory):
    """benchmarks/gpu_check.sh at toy sizes on CPU: the script's own steps (its --dry-run lists each `stainmil
    bench` argument list, a ViT-S standing in for the ViT-L), each run through the real command line in this
    process (one interpreter, one cohort), then the script's table builder. Made once per test run: under xdist
    the first worker to ask makes it (under a file lock) and the others read it. Returns (OUT, table)."""
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from stainmil.cli import app
    from tests.conftest import made_once

    def build(out: Path) -> None:
        here = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
        steps = subprocess.run([str(here / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--small",
                                "--dry-run"], capture_output=True, text=True, check=True, env=env).stdout
        assert len(steps.splitlines()) == 6 and not out.exists()  # a dry run runs nothing
        for step in steps.splitlines():
            result = CliRunner().invoke(app, ["bench", *shlex.split(step)])
            assert result.exit_code == 0, (step, result.output[-2000:], result.exception)
        subprocess.run([sys.executable, str(here / "benchmarks" / "gpu_table.py"), str(out), "cpu", "tiny", "32",
                        "0", "kaiko_vits16"], capture_output=True, text=True, check=True)

    out = made_once(tmp_path_factory, "gpu_check", build)
    return out, (out / "gpu_check.md").read_text()


def _figures(out, name: str) -> dict:
    import json

    return json.loads((out / name).read_text())


@pytest.mark.slow
def test_gpu_check_script_prints_its_table_on_cpu(gpu_check):
    out, table = gpu_check
    for row in ("densenet121 bare forward", "extract densenet121 from PNGs", "extract densenet121 from slides",
                "kaiko_vits16 bare forward", "extract kaiko_vits16 from PNGs", "extract kaiko_vits16 from slides",
                "feed alone from PNGs", "feed alone from slides", "store epoch vs the old way", "head step",
                "1x (", "3x ("):
        assert row in table, row
    assert "CPU" in table and table.startswith("| figure (tiny preset, 32 px, random weights")


@pytest.mark.slow
def test_bench_runs_end_to_end_on_the_tiny_preset(gpu_check):
    figures = _figures(gpu_check[0], "bench-tiny-densenet121-32px-patches-cpu.json")
    for key in ("backbone_forward_img_s", "extraction_img_s", "extraction_over_forward", "epoch_s_feature_store",
                "epoch_s_old_way", "epoch_s_online_finetune_1_block", "epoch_speedup", "vectorised_speedup",
                "train_peak_rss_mb_store", "train_peak_rss_mb_online_finetune", "process_peak_rss_mb",
                "fwd_bwd_ms_projector_floor", "head_step_over_projector_floor"):
        assert figures[key] > 0, key
    assert figures["max_abs_logit_difference"] < 1e-5


@pytest.mark.slow
def test_bench_extraction_from_slides_with_a_vit(gpu_check):
    figures = _figures(gpu_check[0], "bench-tiny-kaiko_vits16-32px-slides-cpu.json")
    assert figures["encoder"] == "kaiko_vits16" and "slides" in figures["patch_source"]
    assert figures["extraction_img_s"] > 0 and figures["backbone_forward_img_s"] > 0
    assert "epoch_s_feature_store" not in figures


@pytest.mark.slow
def test_scale_bench_trains_bounded_and_in_memory_in_fresh_processes(gpu_check):
    import pandas as pd

    table = pd.read_csv(gpu_check[0] / "scale" / "scale.csv")
    assert list(table["scale"]) == ["1x", "1x", "3x"]  # 3x is past --memory-up-to 1: bounded only
    assert list(table["reading"])[1:] == ["whole store in memory", list(table["reading"])[0]]
    assert list(table["reading"])[0].startswith("cache ")
    assert (table["epoch_s"] > 0).all() and (table["peak_rss_mb"] > 100).all() and (table["read_mb_s"] > 0).all()
    assert table["patches"].iloc[2] > table["patches"].iloc[0] and (gpu_check[0] / "scale" / "scale.md").is_file()


def test_extraction_plan_sizes_itself_to_the_device_unless_told():
    from stainmil.config import FeaturesConfig
    from stainmil.features.plan import extraction_plan

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert extraction_plan(FeaturesConfig(), cpu, cores=2) == extraction_plan(FeaturesConfig(), cpu, cores=3)
    plan = extraction_plan(FeaturesConfig(), cpu, cores=16)
    assert (plan.batch_size, plan.workers, plan.precision) == (32, 4, "fp32")
    assert extraction_plan(FeaturesConfig(), cpu, cores=2).workers == 1  # the encoder needs the other core
    plan = extraction_plan(FeaturesConfig(), gpu, cores=16)
    assert (plan.batch_size, plan.workers, plan.precision) == (256, 15, "fp32")  # DenseNet's card: fp32
    assert extraction_plan(FeaturesConfig(backbone="uni_v1"), gpu, cores=64).workers == 16
    assert extraction_plan(FeaturesConfig(backbone="uni_v1"), gpu).autocast == torch.float16  # as its card says
    assert extraction_plan(FeaturesConfig(backbone="uni_v2"), gpu).autocast == torch.bfloat16
    assert extraction_plan(FeaturesConfig(backbone="uni_v1"), cpu).autocast is None  # never half precision on CPU
    told = FeaturesConfig(batch_size=8, num_workers=0, precision="bf16")
    assert extraction_plan(told, gpu, cores=16) == type(plan)(8, 0, "bf16")


def test_feed_only_counts_every_patch_with_each_worker_count(tiny_cohort):
    from stainmil.bench.feed import feed_table, worker_counts

    assert worker_counts(2) == [0, 1, 2] and worker_counts(6) == [0, 1, 2, 4, 6] and worker_counts(16)[-1] == 16
    refs = sorted(str(p) for p in (tiny_cohort / "patches").rglob("*.png"))[:96]
    table = feed_table({"PNGs": refs}, 32, 32, cores=2, log=lambda *_: None)
    assert list(table["workers"]) == [0, 1, 2] and (table["img_s"] > 0).all()
    assert table["speedup_vs_1"].iloc[1] == 1.0


def test_aligned_by_verdict_splits_a_comparison_by_registration_verdict(tmp_path):
    """benchmarks/aligned_by_verdict.py: each model's out-of-fold scores for fully aligned cases and the others."""
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd
    import yaml

    (tmp_path / "tiles" / "registration").mkdir(parents=True)
    pd.DataFrame({"case": ["1", "1", "2", "3"], "stain": ["melan", "sox10", "melan", "melan"], "slice": "0",
                  "fixed_stain": "he", "fixed_slice": "0", "verdict": ["aligned", "failed", "aligned", "aligned"],
                  "transform": "x.h5"}).to_csv(tmp_path / "tiles" / "registration" / "registrations.csv", index=False)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "tile": {"out_dir": str(tmp_path / "tiles")}}))
    for model, probs in (("hierarchical", [0.2, 0.9, 0.1]), ("aligned", [0.6, 0.8, 0.3])):
        for seed in (0, 1):
            (tmp_path / "cmp" / model / f"seed_{seed}").mkdir(parents=True)
            pd.DataFrame({"case": ["1", "2", "3"], "label": [0, 1, 0], "prob_0": [1 - p for p in probs],
                          "prob_1": probs}).to_csv(tmp_path / "cmp" / model / f"seed_{seed}" / "oof_predictions.csv",
                                                   index=False)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "aligned_by_verdict.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "cmp"), str(config)], capture_output=True,
                         text=True, check=True).stdout
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()[2:]}
    assert rows["every IHC slice aligned"][0].strip() == "2" and rows["a pair doubtful or failed"][0].strip() == "1"
    # case 1 (label 0) alone in the failed group: aligned 0.6 -> Brier 0.36, hierarchical 0.2 -> 0.04
    failed = [cell.strip() for cell in rows["a pair doubtful or failed"][1:]]
    assert failed[0] == "0.360" and failed[3] == "0.040"  # models sorted: aligned, hierarchical
    assert rows["all"][0].strip() == "3"
