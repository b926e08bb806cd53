"""Interrupting `quantlab collect` (SIGINT, SIGKILL) leaves no output file and never touches the previous one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CALIB_DIR, DEMO_MODEL


@pytest.fixture()
def slow_run(tmp_path):
    """A collect over 50x the calibration set, one sample per run: long enough to interrupt."""
    data = tmp_path / "data"
    data.mkdir()
    for copy in range(50):
        for path in sorted(CALIB_DIR.glob("*.npy")):
            (data / f"{copy:02d}_{path.name}").write_bytes(path.read_bytes())
    out = tmp_path / "histograms.npz"
    out.write_bytes(b"previous run")

    def start() -> subprocess.Popen:
        command = [sys.executable, "-m", "quantlab", "collect", str(DEMO_MODEL), "-d", str(data), "-b", "1", "-o", str(out)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    return start, out, tmp_path


def wait_until_running(process: subprocess.Popen) -> None:
    time.sleep(2.5)  # imports, model checks and the first batches
    assert process.poll() is None, process.communicate()


def assert_untouched(out, directory) -> None:
    assert out.read_bytes() == b"previous run"
    assert sorted(p.name for p in directory.iterdir()) == ["data", "histograms.npz"]


def test_sigint_exits_within_a_second_and_says_how_far_it_got(slow_run):
    start, out, directory = slow_run
    process = start()
    wait_until_running(process)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=10)
    assert time.monotonic() - sent < 1.0
    assert process.returncode == 130
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("quantlab: error: interrupted during the ") and "samples; nothing written" in line
    assert_untouched(out, directory)


def test_sigkill_leaves_the_previous_file(slow_run):
    start, out, directory = slow_run
    process = start()
    wait_until_running(process)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=10)
    assert process.returncode == -signal.SIGKILL
    assert_untouched(out, directory)
