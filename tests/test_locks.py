"""One writer per folder: a second live process is refused with one sentence naming the holder; a lock left by a
dead process is taken over; the shards of one job share the folder. Real processes, real commands."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stainmil.cli import app
from stainmil.config import dump_config
from stainmil.locks import LOCK_NAME, FolderBusy, folder_lock
from tests.conftest import slide_config
from tests.features.layouts import write_trident

HOLD = """
import sys, time
from stainmil.locks import folder_lock
with folder_lock(sys.argv[1], sys.argv[2], part=sys.argv[3] or None):
    print("held", flush=True)
    time.sleep(60)
"""


class Holder:
    """Another process holding a folder's lock until stopped."""

    def __init__(self, folder: Path, command: str = "extract", part: str = "") -> None:
        self.process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), command, part],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def test_a_live_holder_refuses_a_second_writer_with_one_sentence(tmp_path):
    with Holder(tmp_path, "tile") as holder:
        with pytest.raises(FolderBusy) as refused:
            with folder_lock(tmp_path, "tile"):
                pass
        message = str(refused.value)
        assert f"PID {holder.process.pid}" in message and "`stainmil tile`" in message
        assert str(tmp_path / LOCK_NAME) in message and "\n" not in message
    with folder_lock(tmp_path, "tile"):           # the holder is gone (killed): the kernel released its lock
        pass
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a clean release leaves no holder behind


def test_a_lock_left_by_a_dead_process_is_taken_over_and_said(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"command": "extract", "pid": 999999, "host": "node7",
                                                  "started": time.time() - 3600}))
    said = []
    with folder_lock(tmp_path, "extract", log=said.append):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid()
    assert len(said) == 1 and "PID 999999 on node7" in said[0] and "taken over" in said[0]


def test_shards_share_the_folder_but_not_their_part(tmp_path):
    with Holder(tmp_path, "extract", "shard0of2"), Holder(tmp_path, "extract", "shard1of2"):  # in parallel
        with pytest.raises(FolderBusy):
            with folder_lock(tmp_path, "extract", part="shard1of2"):   # the same shard twice
                pass
        with pytest.raises(FolderBusy):
            with folder_lock(tmp_path, "extract"):                     # the whole folder while shards run
                pass
    with Holder(tmp_path, "extract"):
        with pytest.raises(FolderBusy):
            with folder_lock(tmp_path, "extract", part="shard0of2"):   # a shard while the whole is written
                pass


def test_nested_steps_of_one_process_pass(tmp_path):
    with folder_lock(tmp_path, "cv"):
        with folder_lock(tmp_path, "cv"):
            with folder_lock(tmp_path, "cv", part="fold1"):
                pass
    with Holder(tmp_path, "cv"):                                       # and everything was released
        pass


@pytest.mark.slow
def test_the_commands_refuse_a_folder_another_process_writes(slide_cohort, tmp_path):
    """tile, register, extract, train --resume, cv, compare-models and import-features, each against a real
    second process."""
    config = slide_config(slide_cohort, tmp_path / "work")
    path = tmp_path / "slides.yaml"
    dump_config(config, path)
    runner = CliRunner()
    run = tmp_path / "work" / "runs" / "run_x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(path.read_text())
    trident = tmp_path / "trident"
    write_trident(trident, {"case1_he_slice0": (np.zeros((2, 8), np.float32), np.array([[0, 0], [64, 0]]))}, "uni_v1")
    checks = [
        (Path(config.tile.out_dir), ["tile", "--config", path]),
        (Path(config.tile.out_dir) / "registration", ["register", "--config", path]),
        (config.paths.store, ["extract", "--config", path]),
        (run, ["train", "--resume", run]),
        (tmp_path / "cv", ["cv", "--config", path, "--folds", 2, "--resume", tmp_path / "cv"]),
        (tmp_path / "models", ["compare-models", "--config", path, "--models", "hierarchical,mean", "--folds", 2,
                               "--out", tmp_path / "models"]),
        (config.paths.imported_store, ["import-features", trident, "--config", path]),
    ]
    for index, (folder, args) in enumerate(checks):
        if index == 2:  # extract needs the index `tile` writes on the slide route
            assert runner.invoke(app, ["tile", "--config", str(path)]).exit_code == 0
        with Holder(folder, "holder") as holder:
            result = runner.invoke(app, [str(a) for a in args])
            assert result.exit_code == 2, (args, result.output, result.exception)
            assert f"PID {holder.process.pid}" in result.output and "is being written by" in result.output, args


@pytest.mark.slow
def test_sigterm_stops_a_command_cleanly_and_the_rerun_finishes(prepared, tmp_path):
    """SIGTERM (a SLURM time limit) during `extract`: one sentence, exit 143, no temporary file, nothing half
    written; the same command again finishes the store."""
    import signal

    from stainmil.check import check_folder

    path = tmp_path / "config.yaml"
    dump_config(prepared, path)
    process = subprocess.Popen([sys.executable, "-m", "stainmil", "extract", "--config", str(path),
                                "--set", f"features.store_dir={tmp_path / 'store'}", "--set", "features.batch_size=4"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "STAINMIL_PROGRESS": "0"})
    deadline = time.time() + 120
    while not list((tmp_path / "store").rglob("*.h5")) and time.time() < deadline:  # some slices written
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 143, out[-2000:]
    assert "stopped by SIGTERM" in out and "resume" in out and "Traceback" not in out
    written = len(list((tmp_path / "store").rglob("*.h5")))
    assert 0 < written < 24                                              # stopped part-way
    assert not list((tmp_path / "store").rglob(".*.tmp"))
    result = CliRunner().invoke(app, ["extract", "--config", str(path), "--set",
                                      f"features.store_dir={tmp_path / 'store'}"])
    assert result.exit_code == 0, result.output
    assert check_folder(tmp_path / "store").ok


def test_a_read_only_output_folder_is_one_sentence(tmp_path):
    from stainmil.errors import OutputError

    folder = tmp_path / "out"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root writes anywhere: a read-only mount says the same
            import subprocess as sp

            if sp.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]).returncode != 0:
                pytest.fail("cannot make a read-only folder here (not root, and the folder is writable)")
        with pytest.raises(OutputError, match="cannot be written"):
            with folder_lock(folder / "store", "extract"):
                pass
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
        folder.chmod(0o755)
