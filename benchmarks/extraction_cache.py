"""What one extraction per machine saves for a DVC queue: a workspace plus 3 queued experiments, each preparing the
same VOC-layout tarball in its own workspace, with fcnseg's extracted-data cache (one extraction, hard links into
each workspace) and without it (FCNSEG_EXTRACTED_CACHE=off: one extraction each), in the same run.

The tarball is built here from the synthetic generator in the VOC layout (VOC itself is 2 GB and not on this
machine); time and disk scale with its size. Disk counts each inode once (hard links share their data).

    python benchmarks/extraction_cache.py [--quick]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from common import machine_info, parse_args, write_results

from fcnseg.data.fetch import Resource
from fcnseg.data.prepare import prepare_voc
from fcnseg.data.synthetic import write_synthetic_voc


def disk_bytes(*roots: Path) -> int:
    """Bytes of the regular files under ``roots``, each inode counted once (hard links share their data)."""
    seen, total = set(), 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                stat = path.stat()
                if (stat.st_dev, stat.st_ino) not in seen:
                    seen.add((stat.st_dev, stat.st_ino))
                    total += stat.st_blocks * 512
    return total


def build_tarball(work: Path, images: int) -> tuple[Path, Resource]:
    voc = write_synthetic_voc(work / "src" / "VOCdevkit" / "VOC2012", num_train=images, num_val=images // 4,
                              height=96, width=96)
    tarball = work / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(voc.parent, arcname="VOCdevkit")
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    return tarball, Resource(tarball.name, md5, tarball.stat().st_size, ())


def queue_of(work: Path, tarball: Path, resource: Resource, experiments: int, cache: str) -> dict:
    """A workspace and ``experiments`` temporary workspaces prepared one after another (as `dvc queue start -j 1`)."""
    os.environ["FCNSEG_EXTRACTED_CACHE"] = cache
    dirs, times = [], []
    for index in range(experiments + 1):
        data_dir = work / f"workspace-{index}" / "data"
        start = time.perf_counter()
        prepare_voc(data_dir, tarball=tarball, progress=False, voc_resource=resource)
        times.append(time.perf_counter() - start)
        dirs.append(data_dir)
    roots = [d / "VOCdevkit" for d in dirs] + ([Path(cache)] if cache != "off" else [])
    return {"prepare_s": [round(t, 3) for t in times], "total_s": round(sum(times), 3),
            "disk_bytes": disk_bytes(*roots), "extractions": 1 if cache != "off" else experiments + 1}


def main() -> None:
    args = parse_args(__doc__)
    started, machine = time.perf_counter(), machine_info()
    images, experiments = (400 if args.quick else 2000), 3
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tarball, resource = build_tarball(work, images)
        without = queue_of(work / "off", tarball, resource, experiments, "off")
        with_cache = queue_of(work / "on", tarball, resource, experiments, str(work / "on" / "cache"))
        shutil.rmtree(work / "src")
    payload = {"images": images + images // 4, "tarball_bytes": resource.size, "queued_experiments": experiments,
               "without_cache": without, "with_cache": with_cache,
               "time_ratio": round(with_cache["total_s"] / without["total_s"], 3),
               "disk_ratio": round(with_cache["disk_bytes"] / without["disk_bytes"], 3)}
    print(write_results("extraction_cache", payload, machine, started))
    print(payload)


if __name__ == "__main__":
    main()
