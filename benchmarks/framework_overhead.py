"""Lightning's cost per optimiser step: SegmentationModule under ``lightning.Trainer`` vs a plain PyTorch loop with
the same model, optimiser (``SegmentationModule.configure_optimizers``) and batches, on CPU.

    python benchmarks/framework_overhead.py [--quick]

Two plain loops are measured: ``bare`` (forward, loss, backward, step) and ``same work`` (also updates the
module's training confusion matrix, as ``training_step`` does), so the overhead splits into what fcnseg's module
does per step and what Lightning itself adds. Repeats alternate between the arms so that load from other jobs on
the machine hits all of them alike; rates are steps/s after ``warmup`` steps, medians over repeats.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bar_plot, machine_info, make_module, parse_args, write_results  # noqa: E402

import torch  # noqa: E402


def make_batches(count: int, batch: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        images = torch.randn(batch, 3, size, size, generator=generator)
        masks = torch.randint(0, 21, (batch, size, size), generator=generator)
        masks[:, :4] = 255  # some void, as real labels have
        out.append((images, masks))
    return out


def loader(batches):
    # batch_size=None: the pre-made batches come out as they are, in order
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


def rate(stamps: list[float], warmup: int) -> float:
    """Steps/s between the end of step ``warmup`` and the end of the last step."""
    return (len(stamps) - warmup) / (stamps[-1] - stamps[warmup - 1])


def plain_loop(module, batches, warmup: int, same_work: bool) -> float:
    net, criterion, metrics = module.net, module.criterion, module.train_metrics
    optimizer = module.configure_optimizers()
    net.train()
    stamps = []
    for images, masks in loader(batches):
        logits = net(images)
        loss = criterion(logits.float(), masks.long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if same_work:
            if not torch.isfinite(loss):
                raise RuntimeError("non-finite loss")
            metrics.update(logits.detach(), masks)
        stamps.append(time.perf_counter())
    metrics.reset()
    return rate(stamps, warmup)


def lightning_fit(module, batches, warmup: int) -> float:
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.stamps.append(time.perf_counter())

    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader(batches))
    return rate(timer.stamps, warmup)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--size", type=int, default=96),
        p.add_argument("--batch", type=int, default=8),
        p.add_argument("--width", type=float, default=0.25),
    ))
    import logging
    import warnings

    import lightning  # noqa: F401  (its import sets its loggers' levels: quieten them afterwards)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    started = time.perf_counter()
    machine = machine_info()
    warmup, steps, repeats = (1, 2, 1) if args.quick else (2, 5, 3)
    batches = make_batches(warmup + steps, args.batch, args.size)
    torch.manual_seed(0)
    initial = make_module(args.width)
    arms = {
        "plain PyTorch, bare": lambda m: plain_loop(m, batches, warmup, same_work=False),
        "plain PyTorch, same work (metrics update)": lambda m: plain_loop(m, batches, warmup, same_work=True),
        "Lightning Trainer + SegmentationModule": lambda m: lightning_fit(m, batches, warmup),
    }
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(repeats):
        for name, run in arms.items():
            rates[name].append(run(copy.deepcopy(initial)))  # every arm starts from the same weights
        print(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(f"{v[-1]:.3f}" for v in rates.values()) + " steps/s",
              flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    lightning = medians["Lightning Trainer + SegmentationModule"]
    bare, same = medians["plain PyTorch, bare"], medians["plain PyTorch, same work (metrics update)"]
    results = {name: {"steps_per_s_median": medians[name], "steps_per_s": rates[name],
                      "ratio_vs_bare": medians[name] / bare} for name in arms}
    overhead_total = (bare / lightning - 1) * 100  # extra time per step, %
    overhead_lightning = (same / lightning - 1) * 100
    best = {name: max(values) for name, values in rates.items()}  # least disturbed repeat of each arm
    overhead_best = (best["plain PyTorch, same work (metrics update)"]
                     / best["Lightning Trainer + SegmentationModule"] - 1) * 100
    payload = {
        "config": {"model": f"fcn8s width {args.width}", "batch": args.batch, "size": args.size, "optimizer":
                   "SGD momentum 0.9, wd 5e-4, biases 2x lr (configure_optimizers)", "warmup_steps": warmup,
                   "timed_steps": steps, "repeats": repeats, "quick": args.quick},
        "results": results,
        "overhead_pct_vs_bare_loop": overhead_total,
        "overhead_pct_vs_same_work_loop": overhead_lightning,
        "overhead_pct_vs_same_work_loop_best_repeats": overhead_best,
        "goal": "overhead <= 5%",
    }
    path = write_results("framework_overhead", payload, machine, started)
    bar_plot("framework_overhead", list(arms), [medians[n] for n in arms], "optimizer steps/s (median)",
             f"FCN-8s w{args.width}, {args.batch}x{args.size}², CPU")
    print(f"framework_overhead: Lightning {lightning:.3f} steps/s vs plain {bare:.3f} (bare, {overhead_total:+.1f}% "
          f"time/step) and {same:.3f} (same work, {overhead_lightning:+.1f}%); goal <= 5%; {path}")


if __name__ == "__main__":
    main()
