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

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o600 == 0o600
