"""Atomic writes: the old file or the complete new one, with the permissions any other output would get."""

import os
import stat
import subprocess
import sys

import pytest

from stainmil.io import atomic_write, atomic_write_text


def test_an_atomic_write_gets_the_process_umask_without_the_library_changing_it(tmp_path):
    """Importing stainmil never flips the process umask (a race with threads); files are 0666 less the umask."""
    code = ("import os; os.umask(0o027); import stainmil.io as io, stat; "
            "p = io.atomic_write_text(os.path.join({!r}, 'a.txt'), 'x'); "
            "print(oct(stat.S_IMODE(os.stat(p).st_mode)), oct(os.umask(0)))")
    out = subprocess.run([sys.executable, "-c", code.format(str(tmp_path))],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0o640", "0o27"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "table.csv", "old\n")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    from stainmil.errors import OutputError

    with pytest.raises(OutputError, match="is full"):             # one sentence naming the folder
        atomic_write(target, fail)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o600 == 0o600


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root, as CI runs), else a folder whose writes fail with ENOSPC (an injected OSError)."""
    import errno
    import subprocess
    from unittest import mock

    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if mounted:
        yield folder, "tmpfs"
        subprocess.run(["umount", str(folder)], check=True)
        return
    real_replace = os.replace

    def full(src, dst):
        if str(dst).startswith(str(folder)):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    with mock.patch("os.replace", full):
        yield folder, "injected"


def test_a_full_disk_keeps_the_old_file_and_says_which_folder(small_disk):
    import numpy as np

    from stainmil.errors import OutputError
    from stainmil.features.store import write_slice
    from stainmil.io import atomic_write_text

    folder, how = small_disk
    (folder / "kept.txt").write_text("old")
    with pytest.raises(OutputError) as full:
        atomic_write_text(folder / "kept.txt", "x" * 200_000)
    assert str(folder) in str(full.value) and "is full" in str(full.value) and "again" in str(full.value), how
    with pytest.raises(OutputError, match="is full"):
        write_slice(folder / "slice.h5", np.zeros((2000, 64), np.float32), np.zeros((2000, 2)),
                    [str(i) for i in range(2000)], {})
    assert (folder / "kept.txt").read_text() == "old"
    assert sorted(p.name for p in folder.iterdir()) == ["kept.txt"]       # no temporary left, no half file


def test_walk_follows_linked_folders_once_and_survives_a_loop(tmp_path):
    from stainmil.io import walk_files

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "p.png").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "q.png").write_text("y")
    (tmp_path / "a" / "linked").symlink_to(elsewhere)            # a cohort assembled from links: followed
    (tmp_path / "a" / "b" / "loop").symlink_to(tmp_path / "a")   # a loop: entered once, then the walk stops
    found = [p.relative_to(tmp_path).as_posix() for p in walk_files(tmp_path / "a")]
    assert found == ["a/b/p.png", "a/linked/q.png"]
