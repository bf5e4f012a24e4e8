from pathlib import Path

import pytest

from stainmil.config import SlurmConfig
from stainmil.errors import ConfigError
from stainmil.experiments.scripts import command_for
from stainmil.launch import Launch, sbatch_script, slurm_parameters

GOLDEN = Path(__file__).parent / "golden" / "cv_array.sbatch"
SLURM = SlurmConfig(partition="gpu", time=240, gpus=1, mem=32, cpus=8, account="e32998", array_parallelism=4,
                    extra=["--qos=normal"], setup=["module load python", "source /projects/venv/bin/activate"])


def test_sbatch_script_matches_the_golden_file():
    command, array = command_for("cv", Path("/p/my.yaml"), 8, 5, 4, Path("/p/runs/cv_1"), 50)
    assert array == 5
    text = sbatch_script(command, SLURM, "stainmil-cv", array=array, log_dir="/p/slurm_logs")
    assert text == GOLDEN.read_text()


def test_submitit_parameters():
    params = slurm_parameters(SLURM, "x")
    assert params["slurm_partition"] == "gpu" and params["gpus_per_node"] == 1 and params["timeout_min"] == 240
    assert params["slurm_additional_parameters"] == {"qos": "normal"}
    assert params["slurm_setup"][0] == "module load python"
    assert "slurm_partition" not in slurm_parameters(SlurmConfig(), "x")


def test_extract_and_tune_commands():
    assert command_for("extract", Path("c.yaml"), 8, 5, 4, None, 50) == (
        "stainmil extract --config c.yaml --shards 8 --shard-index $SLURM_ARRAY_TASK_ID", 8)
    assert command_for("tune", Path("c.yaml"), 8, 5, 4, None, 50) == (
        "stainmil tune --config c.yaml --trials 13 --workers 1", 4)


def _sleeper(folder: str, name: str, seconds: float) -> str:
    """A job for the pool tests: marks when it starts and when its ``finally`` runs."""
    import time

    (Path(folder) / f"{name}.started").write_text("")
    try:
        if name == "fails":
            raise ValueError("this job fails")
        time.sleep(seconds)
        return name
    finally:
        (Path(folder) / f"{name}.cleaned").write_text("")


POOL_DRIVER = """
import sys
from pathlib import Path
from stainmil.config import SlurmConfig
from stainmil.launch import Launch, run_jobs
from stainmil.stopping import Terminated, stop_cleanly_on_sigterm
from tests.test_launch import _sleeper
folder = sys.argv[1]
stop_cleanly_on_sigterm()
try:
    run_jobs(_sleeper, [(folder, f"job{i}", 300) for i in range(4)], Launch(workers=2, log=lambda *_: None),
             Path(folder), SlurmConfig())
except Terminated:
    sys.exit(143)
"""


def test_sigterm_stops_a_local_pool_at_once_and_its_running_jobs_clean_up(tmp_path):
    """`cv --workers 2` killed by a time limit: queued folds never start, running ones run their `finally`
    (temporaries, locks); before, the pool ran every remaining fold to the end first."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", POOL_DRIVER, str(tmp_path)], cwd=Path(__file__).parents[1],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("*.started"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(p.name for p in tmp_path.glob("*.started")) == ["job0.started", "job1.started"], \
        process.communicate()[0] if process.poll() is not None else "the workers never started"
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=120)  # the jobs sleep 300 s: only a stop that stops ends in time
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("SIGTERM did not stop the pool: it went on running its jobs") from None
    assert process.returncode == 143, output
    assert (tmp_path / "job0.cleaned").is_file() and (tmp_path / "job1.cleaned").is_file(), \
        "a running job was killed without its finally"
    assert not (tmp_path / "job2.started").exists() and not (tmp_path / "job3.started").exists(), \
        "queued jobs started after SIGTERM"
    assert "Traceback" not in output, output


def test_a_failing_job_lets_the_others_in_the_pool_finish_then_is_raised(tmp_path):

    from stainmil.launch import run_jobs

    with pytest.raises(ValueError, match="this job fails"):
        run_jobs(_sleeper, [(str(tmp_path), "fails", 0), (str(tmp_path), "slow", 3)],
                 Launch(workers=2, log=lambda *_: None), tmp_path, SlurmConfig())
    assert (tmp_path / "slow.cleaned").is_file(), "the other job was cut short by the failure"


def test_experiment_functions_take_the_config_then_keywords_only():
    """Run settings travel as one Launch value, by keyword: a call by position is refused, not misread."""
    import inspect

    from stainmil.config import Config
    from stainmil.experiments.compare import compare_encoders
    from stainmil.experiments.compare_models import compare_models
    from stainmil.experiments.cv import run_cv
    from stainmil.experiments.nested import run_nested_cv
    from stainmil.experiments.seeds import run_cv_seeds
    from stainmil.experiments.tune import run_tune
    from stainmil.features.extract import extract_sharded

    for fn in (run_cv, run_cv_seeds, compare_models, compare_encoders, run_tune, run_nested_cv, extract_sharded):
        first, *rest = inspect.signature(fn).parameters.values()
        assert first.name == "config" and all(p.kind is p.KEYWORD_ONLY for p in rest), fn.__name__
        assert inspect.signature(fn).parameters["launch"].default == Launch()
    with pytest.raises(TypeError, match="positional"):
        run_cv(Config(), 3, 1, None, "slurm")


def test_a_launch_names_a_wrong_launcher_or_worker_count():
    assert Launch("slurm", 4).workers == 4
    with pytest.raises(ConfigError, match="--launcher must be local or slurm, got 'pbs'"):
        Launch("pbs")
    with pytest.raises(ConfigError, match="--workers must be a whole number of at least 1"):
        Launch(workers=0)
