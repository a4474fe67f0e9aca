"""Serving under load: ``mlflow models serve`` of a registered fcnseg model on 127.0.0.1, N concurrent clients
sending a mix of good 500x375 photos and bad requests (decompression-bomb header, junk body, non-image rows).

    python benchmarks/serving_load.py [--width 0.0625] [--clients 8] [--requests 12] [--rounds 3]
                                      [--model torch|onnx] [--onnx-memory-arena] [--quick]

Reports p50/p95 latency per kind of request, answers by status, transport errors and the server's resident memory
(the CLI and its uvicorn worker) before and after each round of the mixed load: memory that climbs once to a level
and stays there is a cache that is reused (allocator pools, onnxruntime's arena), memory that climbs every round is
a leak. Bounded: the request count is fixed and every request times out.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.model_server: the local-server helpers
from common import machine_info, parse_args, write_results  # noqa: E402

import numpy as np  # noqa: E402


def register(tmp: Path, width: float, kind: str) -> tuple[str, str]:
    """A random-weight FCN-8s of ``width`` registered as ``fcn-load`` (PyTorch pyfunc, or exported to ONNX)."""
    import mlflow

    from fcnseg.data.classes import VOC_CLASSES
    from fcnseg.models import build_fcn
    from fcnseg.models.checkpoint import save_net_checkpoint
    from fcnseg.serving import log_pyfunc_model

    config = {"name": "fcn8s", "num_classes": 21, "width": width, "backbone_weights": None,
              "learnable_upsampling": False}
    checkpoint = save_net_checkpoint(build_fcn(**config), config, tmp / "net.ckpt", "imagenet", list(VOC_CLASSES))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    if kind == "onnx":
        subprocess.run([sys.executable, "-m", "fcnseg.cli", "export", "--model", str(checkpoint), "--out",
                        str(tmp / "m.onnx"), "--register", "fcn-load", "--tracking-uri", uri], cwd=tmp, check=True,
                       capture_output=True)
        return uri, "models:/fcn-load/1"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving-load")
    with mlflow.start_run():
        model_uri = log_pyfunc_model(checkpoint, [np.zeros((16, 16, 3), np.uint8)])
    mlflow.register_model(model_uri, "fcn-load")
    return uri, "models:/fcn-load/1"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--width", type=float, default=0.0625),
        p.add_argument("--clients", type=int, default=8),
        p.add_argument("--requests", type=int, default=12, help="requests per client"),
        p.add_argument("--rounds", type=int, default=3, help="rounds of the mixed load, RSS after each"),
        p.add_argument("--model", choices=["torch", "onnx"], default="torch"),
        p.add_argument("--onnx-memory-arena", action="store_true",
                       help="FCNSEG_ONNX_MEMORY_ARENA=1: the ONNX model keeps onnxruntime's CPU arena"),
        p.add_argument("--malloc-arenas", help="MALLOC_ARENA_MAX for the server (glibc: fewer per-thread heaps)"),
    ))
    started = time.perf_counter()
    machine = machine_info()
    from fcnseg.serving_io import encode_image
    from tests.model_server import load_test, post, records, rss_bytes, serve
    from tests.servers import stop
    from tests.test_inference import png_claiming_size

    rng = np.random.default_rng(0)
    photo = encode_image(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    kinds = {
        "good 500x375": records(photo),
        "bomb header 10000x10000": records(base64.b64encode(png_claiming_size(10_000, 10_000)).decode()),
        "junk body 3 MB": b"\x00junk" * 600_000,
        "non-image row": records(base64.b64encode(b"not an image").decode()),
    }
    requests = 3 if args.quick else args.requests
    with tempfile.TemporaryDirectory(prefix="fcnseg-load-") as tmp:
        uri, model_uri = register(Path(tmp), args.width, args.model)
        env = {"MLFLOW_TRACKING_URI": uri, "FCNSEG_MAX_REQUEST_MB": "2", "OMP_NUM_THREADS": "1",
               "NO_ALBUMENTATIONS_UPDATE": "1", "PATH": __import__("os").environ.get("PATH", ""),
               **({"MALLOC_ARENA_MAX": args.malloc_arenas} if args.malloc_arenas else {}),
               **({"FCNSEG_ONNX_MEMORY_ARENA": "1"} if args.onnx_memory_arena else {})}
        server, url = serve(model_uri, Path(tmp), env)
        try:
            post(url, kinds["good 500x375"])  # warm-up: first-call allocations are not the steady state
            rss_before = rss_bytes(server.pid)
            per_kind = {name: load_test(url, [body], args.clients, max(1, requests // len(kinds)))
                        for name, body in kinds.items()}
            rounds = []
            for _ in range(1 if args.quick else args.rounds):
                mixed = load_test(url, list(kinds.values()), args.clients, requests)
                time.sleep(1.0)
                rounds.append({"p50_s": mixed["p50_s"], "p95_s": mixed["p95_s"], "statuses": mixed["statuses"],
                               "rss_after_mb": rss_bytes(server.pid) / 2**20})
            rss_after = rss_bytes(server.pid)
            alive = server.poll() is None and post(url, kinds["good 500x375"])[0] == 200
        finally:
            stop(server)
    payload = {"model": args.model, "net": f"fcn8s width {args.width}", "clients": args.clients,
               "malloc_arena_max": args.malloc_arenas, "onnx_memory_arena": args.onnx_memory_arena,
               "requests_per_client": requests, "per_kind": per_kind, "mixed": mixed, "mixed_rounds": rounds,
               "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20, "alive_after": alive,
               "limits": {"FCNSEG_MAX_REQUEST_MB": 2, "FCNSEG_MAX_FORWARD_MB": "default 4096"}}
    for name, row in {**per_kind, "mixed": mixed}.items():
        print(f"{name:>24}: {row['statuses']}  p50 {row['p50_s'] * 1e3:.0f} ms  p95 {row['p95_s'] * 1e3:.0f} ms")
    after_rounds = " -> ".join(f"{row['rss_after_mb']:.0f}" for row in rounds)
    print(f"RSS {rss_before / 2**20:.0f} MB before, after each mixed round {after_rounds} MB; alive after: {alive}")
    name = (f"serving_load_{args.model}" + (f"_width{args.width:g}" if args.width != 0.0625 else "")
            + (f"_malloc_arena_max{args.malloc_arenas}" if args.malloc_arenas else "")
            + ("_memory_arena" if args.onnx_memory_arena else ""))
    print(f"wrote {write_results(name, payload, machine, started)}")


if __name__ == "__main__":
    main()
