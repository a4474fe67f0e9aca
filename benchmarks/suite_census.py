"""Where the test suite's CPU goes: the README's test command, with every Python process it starts counted.

    python benchmarks/suite_census.py [--repeats N] [-- PYTEST_ARGS...]

Each Python process the suite starts (the xdist workers, training entry points, DDP ranks, DVC, the CLIs, MLflow
servers) records at exit its command, its CPU seconds (user + system) and which of torch, lightning, mlflow and dvc
it imported. The hook is a ``.pth`` file put into this interpreter's site-packages for the run and removed after it
(it does nothing unless ``FCNSEG_SUITE_CENSUS`` names the log), so it reaches processes whose tests set their own
``PYTHONPATH``. It writes before ``os._exit`` too, the way fcnseg's commands end (``process_exit.py``); processes
killed by a signal (the DDP and ``dvc exp run`` kill tests) are not counted.

In the same run, before the suite, it times ``import torch, torchvision, lightning, mlflow, albumentations, hydra``
in a fresh interpreter (``--repeats`` times, median): the CPU every training process pays before it trains. The JSON
(``benchmarks/results/suite_census.json``) gives the suite's wall and CPU time, the CPU-bound floor of the wall
time on this machine's cores, the counted processes per kind, and that import cost summed over the processes that
had lightning loaded (each at most its own CPU: a forked DataLoader worker inherits the modules without paying).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAVY_IMPORTS = "import torch, torchvision, lightning, mlflow, albumentations, hydra, os; os._exit(0)"
HOOK_MODULE = "_fcnseg_suite_census"
HOOK = '''import os, sys
_LOG = os.environ.get("FCNSEG_SUITE_CENSUS")
if _LOG:
    import atexit, json
    _written = []
    def _record():
        if _written:
            return
        _written.append(True)
        times = os.times()
        record = {"argv": sys.argv[:3], "cpu_s": round(times.user + times.system, 2),
                  "imported": [name for name in ("torch", "lightning", "mlflow", "dvc") if name in sys.modules],
                  "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]}
        with open(_LOG, "a") as log:
            log.write(json.dumps(record) + "\\n")
    atexit.register(_record)
    _real_exit = os._exit
    def _exit(status, _real_exit=_real_exit):
        _record()
        _real_exit(status)
    os._exit = _exit
'''


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children, all of theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def import_cost(repeats: int) -> list[float]:
    """CPU seconds of a fresh interpreter importing the training stack, per run."""
    costs = []
    for _ in range(repeats):
        before = children_cpu_s()
        subprocess.run([sys.executable, "-c", HEAVY_IMPORTS], check=True)
        costs.append(round(children_cpu_s() - before, 2))
    return costs


def process_kind(argv: list[str]) -> str:
    """A short name for what a process was: ``train.py``, ``dvc exp``, ``cli.py promote``, ``python -c`` ..."""
    if not argv or argv[0] == "-c":
        return "python -c (xdist workers, inline scripts)"
    program = Path(argv[0]).name
    if program == "__main__.py":
        program = Path(argv[0]).parent.name
    words = [word for word in argv[1:2] if "=" not in word and "/" not in word and not word.startswith("-")]
    return " ".join([program, *words])


def run_suite(log: Path, pytest_args: list[str]) -> tuple[float, float, int]:
    """The README's test command with the hook on: its wall seconds, CPU seconds (it and all it started) and status."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    hook, pth = site_packages / f"{HOOK_MODULE}.py", site_packages / f"{HOOK_MODULE}.pth"
    hook.write_text(HOOK)
    pth.write_text(f"import {HOOK_MODULE}\n")
    try:
        before, start = children_cpu_s(), time.perf_counter()
        status = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT,
                                env={**os.environ, "FCNSEG_SUITE_CENSUS": str(log)}).returncode
        return time.perf_counter() - start, children_cpu_s() - before, status
    finally:
        pth.unlink(missing_ok=True)
        hook.unlink(missing_ok=True)


def summarize(records: list[dict], top: int = 25) -> dict:
    cpu, count = Counter(), Counter()
    for record in records:
        kind = process_kind(record["argv"])
        cpu[kind] += record["cpu_s"]
        count[kind] += 1
    return {kind: {"processes": count[kind], "cpu_s": round(seconds, 1)} for kind, seconds in cpu.most_common(top)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings of the training stack's imports (median)")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (default: none, as the README)")
    args = parser.parse_args()
    started = time.perf_counter()
    machine = machine_info()
    costs = import_cost(args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "processes.jsonl"
        wall, cpu, status = run_suite(log, args.pytest_args)
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    cores = machine["usable_cores"]
    lightning = [record for record in records if "lightning" in record["imported"]]
    torch_users = [record for record in records if "torch" in record["imported"]]
    import_s = statistics.median(costs)
    payload = {
        "pytest_args": args.pytest_args, "pytest_status": status,
        "suite_wall_s": round(wall, 1), "suite_cpu_s": round(cpu, 1),
        "cpu_bound_wall_floor_s": round(cpu / cores, 1), "cores_busy": round(cpu / wall, 2),
        "processes_counted": len(records), "counted_cpu_s": round(sum(r["cpu_s"] for r in records), 1),
        "processes_importing_torch": {"processes": len(torch_users),
                                      "cpu_s": round(sum(r["cpu_s"] for r in torch_users), 1)},
        "processes_importing_lightning": {"processes": len(lightning),
                                          "cpu_s": round(sum(r["cpu_s"] for r in lightning), 1)},
        "training_stack_import_cpu_s": costs,
        # a forked DataLoader worker inherits the loaded modules without paying for them, and a process that failed
        # early paid less: each counts at most its own CPU
        "lightning_processes_import_cpu_s": round(sum(min(r["cpu_s"], import_s) for r in lightning), 1),
        "by_kind": summarize(records),
    }
    path = write_results("suite_census", payload, machine, started)
    print(f"suite {wall:.0f} s wall, {cpu:.0f} s CPU ({cpu / wall:.2f} of {cores} cores busy); "
          f"{len(lightning)} processes had lightning loaded (forked DataLoader workers included), "
          f"{import_s:.1f} s CPU each to import the stack: "
          f"{payload['lightning_processes_import_cpu_s']:.0f} s in all. {path}")
    sys.exit(status)


if __name__ == "__main__":
    main()
