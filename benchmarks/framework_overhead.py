"""Lightning's cost per optimiser step, as training runs: ``fcnseg.train.train`` vs a plain PyTorch loop with the
same module, optimiser and batches, on CPU.

    python benchmarks/framework_overhead.py [--quick] [--repeats N]

**Real** arm: ``fcnseg.train.train`` on the config composed from ``conf/`` (``model=fcn8s``, ``optim=sgd``,
``trainer=cpu``), i.e. ``SegmentationModule`` under ``lightning.Trainer`` with the callbacks and loggers training
uses (best/last checkpoints, RNG state, LR monitor, CSV, MLflow to a local SQLite store when mlflow is importable);
only the datamodule is ``common.InMemoryDataModule`` (the same pre-made batches as the loops). Its rate is
``global_step`` over the time between two marks inside the epoch (checkpointing and validation at the epoch's end
fall outside). Two plain loops over the same batches, with ``build_module``'s net, criterion and optimiser:
``bare`` (forward, loss, backward, step) and ``same work`` (also the module's training-metric update and
non-finite check, at the intervals its config sets). Repeats alternate the arms (A B C A B C ...) so that load from
other jobs hits all alike; the JSON gives every repeat and the spread, and a difference is claimed only when the
arms' ranges over repeats do not overlap.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bar_plot, compose, machine_info, measure_real, parse_args, write_results  # noqa: E402

import torch  # noqa: E402

MODEL = ["model=fcn8s", "optim=sgd", "trainer=cpu"]


def make_batches(count: int, batch: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches ``common.InMemoryDataModule`` makes (same seed, same generator order)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        images = torch.randn(batch, 3, size, size, generator=generator)
        masks = torch.randint(0, 21, (batch, size, size), generator=generator).to(torch.uint8)
        masks[:, :4] = 255
        out.append((images, masks))
    return out


def plain_loop(width: float, batches: list, num_steps: int, timing_start: int, same_work: bool) -> float:
    """Steps/s of a plain loop between the same marks as the real arm's (step ``timing_start`` to the last)."""
    from fcnseg.train import build_module

    torch.manual_seed(0)
    module = build_module(compose([*MODEL, "model.net.backbone_weights=null", f"model.net.width={width}"]))
    net, criterion, metrics = module.net, module.criterion, module.train_metrics
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    metrics_every = int(module.hparams.get("train_metrics_every_n_steps", 1))
    finite_every = int(module.hparams.get("nonfinite_check_every_n_steps", 1))
    net.train()
    start = None
    for step in range(num_steps):
        if step == timing_start:
            start = time.perf_counter()
        images, masks = batches[step % len(batches)]
        logits = net(images)
        loss = criterion(logits.float(), masks.long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if same_work:
            if metrics_every and step % metrics_every == 0:
                metrics.update(logits.detach(), masks)
            if finite_every and (step + 1) % finite_every == 0 and not torch.isfinite(loss):
                raise RuntimeError("non-finite loss")
    return (num_steps - timing_start) / (time.perf_counter() - start)


def spread(values: list[float]) -> dict[str, float]:
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "spread_pct_of_median": (max(values) - min(values)) / median * 100}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--size", type=int, default=96),
        p.add_argument("--batch", type=int, default=8),
        p.add_argument("--width", type=float, default=0.25),
        p.add_argument("--repeats", type=int, default=None),
    ))
    import logging
    import warnings

    import lightning  # noqa: F401  (its import sets its loggers' levels: quieten them afterwards)

    for name in ("lightning.pytorch", "lightning.fabric", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.use_deterministic_algorithms(True)  # trainer=cpu sets it (and leaves it set): the loops run alike
    started = time.perf_counter()
    machine = machine_info()
    warmup, timed = (2, 4) if args.quick else (3, 10)
    repeats = args.repeats or (2 if args.quick else 5)
    num_steps = warmup + timed
    # The real arm's timer marks fall at fetches (Lightning looks one batch ahead), so it gets one more batch.
    batches = make_batches(4, args.batch, args.size)
    arms = {
        "plain PyTorch, bare": lambda: plain_loop(args.width, batches, num_steps, warmup, same_work=False),
        "plain PyTorch, same work": lambda: plain_loop(args.width, batches, num_steps, warmup, same_work=True),
        "fcnseg.train.train (Trainer + callbacks + loggers)": lambda: measure_real(
            MODEL, False, args.width, args.size, args.batch, num_steps + 1, warmup + 1)["steps_per_s"],
    }
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(repeats):
        for name, run in arms.items():
            rates[name].append(run())
        print(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(f"{v[-1]:.3f}" for v in rates.values()) + " steps/s",
              flush=True)
    stats = {name: spread(values) for name, values in rates.items()}
    real_name, same_name, bare_name = list(arms)[2], list(arms)[1], list(arms)[0]
    real, same, bare = (stats[n]["median"] for n in (real_name, same_name, bare_name))
    overhead_same = (same / real - 1) * 100  # extra time per step vs the loop doing the same work, %
    overhead_bare = (bare / real - 1) * 100
    # A difference stands outside the noise only when the ranges over repeats do not overlap.
    disjoint = stats[real_name]["max"] < stats[same_name]["min"] or stats[real_name]["min"] > stats[same_name]["max"]
    payload = {
        "config": {"model": f"fcn8s width {args.width}", "batch": args.batch, "size": args.size,
                   "optimizer": "optim=sgd via SegmentationModule.configure_optimizers", "warmup_steps": warmup,
                   "timed_steps": timed, "repeats": repeats, "quick": args.quick},
        "results": {name: {"steps_per_s": rates[name], **stats[name], "ratio_vs_bare": stats[name]["median"] / bare}
                    for name in arms},
        "overhead_pct_vs_same_work_loop": overhead_same,
        "overhead_pct_vs_bare_loop": overhead_bare,
        "difference_outside_noise": disjoint,
        "conclusion": (f"{overhead_same:+.1f}% time/step vs the same-work loop"
                       + ("" if disjoint else ": within the spread over repeats, no measurable overhead")),
        "goal": "overhead <= 5%",
    }
    path = write_results("framework_overhead", payload, machine, started)
    bar_plot("framework_overhead", list(arms), [stats[n]["median"] for n in arms], "optimizer steps/s (median)",
             f"FCN-8s w{args.width}, {args.batch}x{args.size}², CPU, {repeats} repeats")
    print(f"framework_overhead: real {real:.3f} steps/s (spread {stats[real_name]['spread_pct_of_median']:.0f}%) vs "
          f"same-work loop {same:.3f} (spread {stats[same_name]['spread_pct_of_median']:.0f}%): "
          f"{payload['conclusion']}; vs bare loop {overhead_bare:+.1f}%; {path}")


if __name__ == "__main__":
    main()
