from pathlib import Path

from stainmil.config import SlurmConfig
from stainmil.experiments.scripts import command_for
from stainmil.launch import sbatch_script, slurm_parameters

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
