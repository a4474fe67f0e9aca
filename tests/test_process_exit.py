"""A command that succeeded ends without Python's teardown, after everything exit normally does before it; one that
failed exits as Python makes it exit (fcnseg.process_exit), in a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import ROOT, subprocess_env

COMMAND = """
import atexit, logging, sys
from fcnseg.process_exit import run_then_exit

marker = sys.argv[1]


class TornDown:
    def __del__(self, open=open, path=marker + ".teardown"):  # a module global: freed only by the teardown
        open(path, "w").write("torn down")  # (what it uses is bound here: the teardown clears globals)


kept = TornDown()


def main():
    atexit.register(lambda: open(marker + ".atexit", "w").write("ran"))
    handler = logging.FileHandler(marker + ".log", delay=False)
    logging.getLogger("command").addHandler(handler)
    logging.getLogger("command").warning("logged")
    sys.stdout.write("printed without a newline")  # still in the buffer when main returns
    if sys.argv[2] != "succeed":
        raise SystemExit(3)


run_then_exit(main)
"""


@pytest.mark.parametrize("outcome", ["succeed", "fail"])
def test_a_command_that_succeeded_skips_the_teardown_and_one_that_failed_does_not(tmp_path: Path,
                                                                                  outcome: str) -> None:
    marker = tmp_path / "marker"
    result = subprocess.run([sys.executable, "-c", COMMAND, str(marker), outcome], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == (0 if outcome == "succeed" else 3), result.stderr
    assert result.stdout == "printed without a newline"  # flushed either way
    assert Path(f"{marker}.atexit").read_text() == "ran"  # handlers registered by the command ran
    assert Path(f"{marker}.log").read_text() == "logged\n"  # logging flushed and closed
    assert Path(f"{marker}.teardown").exists() == (outcome == "fail")  # skipped only after a success
