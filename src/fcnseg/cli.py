"""The ``fcnseg`` command: fetch data, evaluate, predict, manage the model registry, import published weights.

Training is Hydra's: ``python -m fcnseg.train …`` (or ``fcnseg-train``); the pipeline is DVC's: ``dvc repro``.

Each command imports what it runs inside its own function: ``fcnseg fetch`` or ``--help`` must not pay the seconds
that importing torch, MLflow or Lightning takes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from fcnseg.cli_errors import exit_on_user_error
from fcnseg.process_exit import run_then_exit

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {}


def command(name: str, help: str):
    """Registers ``run(args)`` as a subcommand; ``configure(parser)`` is the function's ``configure`` attribute."""

    def decorate(run):
        COMMANDS[name] = (help, run.configure, run)
        return run

    return decorate


def _configure(configure: Callable[[argparse.ArgumentParser], None]):
    def attach(run):
        run.configure = configure
        return run

    return attach


def _tracking_uri_option(p: argparse.ArgumentParser,
                         default: str = "$MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db") -> None:
    """The one ``--tracking-uri`` option of every command that talks to MLflow (resolved by
    :func:`fcnseg.runs.resolve_tracking_uri`)."""
    p.add_argument("--tracking-uri", help=f"the MLflow store: runs, registry, models:/ URIs (default: {default})")


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=("voc", "ade20k"), default="voc",
                   help="voc: PASCAL VOC 2012 (default); ade20k: ADEChallengeData2016.zip (public, 150 classes). "
                        "Cityscapes needs a login: download its zips, then `python -m fcnseg.pipeline prepare "
                        "data=cityscapes data.zips.leftImg8bit=PATH data.zips.gtFine=PATH`")
    p.add_argument("--data-dir", default="data", help="where downloads/ and the dataset go (default: data)")
    p.add_argument("--tarball", help="the archive you already have: VOCtrainval_11-May-2012.tar or "
                   "ADEChallengeData2016.zip (verified by MD5, then used)")
    p.add_argument("--mirror", action="append", help="ade20k: a URL of ADEChallengeData2016.zip to try (repeat it; "
                   "default: the MIT CSAIL server)")
    p.add_argument("--sbd", action="store_true", help="also fetch SBD for the paper's train_aug split")
    p.add_argument("--sbd-tarball", help="a benchmark.tgz you already have")


@command("fetch", "download (mirrors, resume, MD5) and extract PASCAL VOC 2012 (+SBD) or ADE20K")
@_configure(_fetch_args)
def fetch(args: argparse.Namespace) -> None:
    from fcnseg.data.prepare import prepare_ade20k, prepare_voc

    if args.dataset == "ade20k":
        root = prepare_ade20k({"root": str(Path(args.data_dir) / "ADEChallengeData2016"), "archive": args.tarball,
                               "mirrors": args.mirror}, args.data_dir)
        print(f"ADE20K ready at {root} (train with data=ade20k)")
        return
    root = prepare_voc(args.data_dir, tarball=args.tarball, sbd=args.sbd, sbd_tarball=args.sbd_tarball)
    print(f"VOC ready at {root}")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, a .ckpt, or a pytorch-fcn .pth")
    p.add_argument("--variant", default="fcn8s", help="net of a pytorch-fcn .pth: fcn32s, fcn16s, fcn8s, fcn8s_atonce")
    p.add_argument("--data", required=True, help="the dataset's directory (VOC: the VOC2012 folder), read in the "
                   "layout and with the label mapping of the model's dataset (VOC, folder, Cityscapes, ADE20K)")
    p.add_argument("--split", default="val", help="the split to score, e.g. val (VOC: ImageSets/Segmentation/"
                   "<split>.txt; ADE20K: validation) (default: val)")
    p.add_argument("--out", default="evaluation", help="where metrics.json and plots go (default: evaluation)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--num-overlays", type=int, default=8)
    p.add_argument("--tta", default="none", help="test-time augmentation, a conf/tta setting: none (default), flip, "
                   "mmseg (scales 0.5-1.75 + flip: 12 passes per image)")
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"],
                   help="auto (default): the fastest path for this device/CPU; torch; onnx (onnxruntime, CPU)")
    _tracking_uri_option(p)


@command("evaluate", "the paper's four metrics and per-class IoU of a model on a split of its dataset")
@_configure(_evaluate_args)
def evaluate(args: argparse.Namespace) -> None:
    from fcnseg.evaluate import evaluate_segmenter, print_report, write_reports
    from fcnseg.runtime import load_runtime_segmenter
    from fcnseg.tta import as_tta

    segmenter = load_runtime_segmenter(args.model, args.runtime, device=args.device, variant=args.variant,
                                       tracking_uri=args.tracking_uri)
    segmenter.tta = as_tta(args.tta)
    report = evaluate_segmenter(segmenter, args.data, args.split, num_overlays=args.num_overlays, progress=True)
    out = Path(args.out)
    write_reports(report, out / "metrics.json", out)
    print_report(report)
    print(f"wrote {out / 'metrics.json'}, {out / 'confusion_matrix.png'}, {out / 'per_class_iou.png'}")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or directories of images")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, a .ckpt, or a pytorch-fcn .pth")
    p.add_argument("--variant", default="fcn8s", help="net of a pytorch-fcn .pth: fcn32s, fcn16s, fcn8s, fcn8s_atonce")
    p.add_argument("--out", default="predictions", help="output directory (default: predictions)")
    p.add_argument("--batch-size", type=int, default=8, help="images of the same size per forward pass")
    p.add_argument("--tile-size", type=int, help="segment images larger than this by overlapping windows")
    p.add_argument("--tta", default="none", help="test-time augmentation, a conf/tta setting: none (default), flip, "
                   "mmseg (scales 0.5-1.75 + flip: 12 passes per image; not applied to --tile-size windows)")
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"],
                   help="auto (default): the fastest path for this device/CPU; torch; onnx (onnxruntime, CPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    _tracking_uri_option(p)


@command("predict", "segment images: a palette-PNG label map and an overlay PNG per image (the model's classes)")
@_configure(_predict_args)
def predict(args: argparse.Namespace) -> None:
    from fcnseg.predict import check_writable, predict_files
    from fcnseg.runtime import load_runtime_segmenter
    from fcnseg.tta import as_tta

    check_writable(args.out)  # before the model loads: an unwritable --out must not cost a model load
    tta = as_tta(args.tta)
    segmenter = load_runtime_segmenter(args.model, args.runtime, device=args.device, variant=args.variant,
                                       tracking_uri=args.tracking_uri)
    segmenter.tta = tta
    summary = predict_files(args.inputs, segmenter, args.out, batch_size=args.batch_size, tile_size=args.tile_size)
    print(f"segmented {len(summary.written)} image(s) into {args.out}"
          + (f"; skipped {len(summary.skipped)} unreadable file(s)" if summary.skipped else ""))
    if summary.skipped:
        raise SystemExit(1)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, a .ckpt, or a pytorch-fcn .pth")
    p.add_argument("--variant", default="fcn8s", help="net of a pytorch-fcn .pth: fcn32s, fcn16s, fcn8s, fcn8s_atonce")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    p.add_argument("--out", default="model.onnx", help="file to write (default: model.onnx)")
    p.add_argument("--register", metavar="NAME", help="also log it as a torch-free MLflow model, registered as NAME")
    _tracking_uri_option(p)


@command("export", "an ONNX model (dynamic size, parity-checked against PyTorch), optionally registered")
@_configure(_export_args)
def export(args: argparse.Namespace) -> None:
    from fcnseg.export import export_and_register
    from fcnseg.inference import load_segmenter

    segmenter = load_segmenter(args.model, device="cpu", variant=args.variant, precision="fp32",
                               channels_last=False, tracking_uri=args.tracking_uri)
    parity, version = export_and_register(segmenter, args.out, args.register, args.model, args.tracking_uri)
    print(f"wrote {args.out}: parity with PyTorch over {len(parity.sizes)} sizes: argmax agreement "
          f"{parity.argmax_agreement:.5f}, max abs logit difference {parity.max_abs_diff:.2e}")
    if version is not None:
        print(f"registered {args.register} version {version}; serve it with: "
              f"mlflow models serve -m models:/{args.register}/{version}")


def _import_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC.pth", help="a wkentaro/pytorch-fcn checkpoint (e.g. fcn8s_from_caffe.pth)")
    p.add_argument("--variant", required=True, help="fcn32s, fcn16s, fcn8s or fcn8s_atonce")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--out", help="fcnseg checkpoint to write (default: <variant>_imported.ckpt)")
    p.add_argument("--normalization", default="caffe",
                   help="input normalisation the weights expect (the Caffe-converted nets: caffe)")
    p.add_argument("--register", metavar="NAME", help="also log it as an MLflow model and register it under NAME")
    p.add_argument("--val-mean-iou", type=float, help="its measured val mean IoU (recorded for promotion)")
    _tracking_uri_option(p)


@command("import-weights", "turn a pytorch-fcn checkpoint into an fcnseg checkpoint (and MLflow model)")
@_configure(_import_weights_args)
def import_weights(args: argparse.Namespace) -> None:
    from fcnseg.models.checkpoint import save_net_checkpoint
    from fcnseg.data.classes import class_names_for
    from fcnseg.models import build_fcn, load_reference_weights

    net_config = {"name": args.variant, "num_classes": args.num_classes, "width": 1.0,
                  "backbone_weights": None, "learnable_upsampling": False}
    net = build_fcn(**net_config)
    load_reference_weights(net, args.source)
    out = save_net_checkpoint(net, net_config, args.out or f"{args.variant}_imported.ckpt",
                                args.normalization, class_names_for(args.num_classes))
    print(f"wrote {out}")
    if args.register:
        from fcnseg.publish import log_imported_model

        version = log_imported_model(out, args.register, args.source, args.variant,
                                     val_mean_iou=args.val_mean_iou, tracking_uri=args.tracking_uri)
        print(f"registered {args.register} version {version} (alias challenger); "
              f"promote with: fcnseg promote {args.register} {version}")


def _registry_client(args: argparse.Namespace):
    """The registry of ``--tracking-uri`` (else $MLFLOW_TRACKING_URI, else the project's SQLite store)."""
    from fcnseg import registry
    from fcnseg.runs import resolve_tracking_uri

    return registry.client_for(resolve_tracking_uri(args.tracking_uri))


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="registered model name, e.g. fcn-voc")
    p.add_argument("version", help="the version to make champion")
    p.add_argument("--force", action="store_true",
                   help="promote even if not better, on another evaluation set or with a class dropping (recorded)")
    p.add_argument("--per-class-margin", type=float, default=0.05,
                   help="refuse when any class's IoU drops by more than this (default 0.05 = 5 points)")
    _tracking_uri_option(p)


@command("promote", "move the 'champion' alias to a version if it beats the champion on the same evaluation set")
@_configure(_promote_args)
def promote(args: argparse.Namespace) -> None:
    from fcnseg import registry

    client = _registry_client(args)
    decision = registry.promote(args.name, args.version, force=args.force, client=client,
                                per_class_margin=args.per_class_margin)
    print(decision.report())


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default="fcn-voc")
    _tracking_uri_option(p)


@command("models", "list a registered model's versions: aliases, mean IoU, evaluation set and lineage")
@_configure(_models_args)
def models(args: argparse.Namespace) -> None:
    from fcnseg import registry

    client = _registry_client(args)
    rows = registry.list_versions(args.name, client=client)
    print(f"{'version':>7}  {'aliases':<20}  {'val mIoU':>8}  {'data version':<12}  {'eval split':<22}  git commit")
    for row in rows:
        iou = row.get("val_mean_iou")
        split = row.get("eval_split")
        evaluated = f"{split} ({row['eval_ids_sha256'][:8]})" if split and row.get("eval_ids_sha256") else ""
        commit = (row.get("git_commit") or "")[:12] + ("+dirty" if row.get("git_dirty") == "true" else "")
        print(f"{row['version']:>7}  {','.join(row.get('aliases', [])):<20}  "
              f"{'' if iou is None else f'{float(iou):.4f}':>8}  {(row.get('data_version') or '')[:12]:<12}  "
              f"{evaluated:<22}  {commit}")
        if row.get("dataset"):  # the model's classes, from its metadata
            print(f"{'':>9}classes of {row['dataset']}: {row.get('num_classes') or '?'}")
        for dataset in row.get("datasets", []):
            print(f"{'':>9}dataset {dataset}")
        for stage, hashes in sorted((row.get("dvc_lock") or {}).items()):
            print(f"{'':>9}dvc.lock {stage}: {hashes}")


def _reproduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_URI", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--run", action="store_true", dest="execute",
                   help="run the commands here (git checkout, data, training)")
    _tracking_uri_option(p)


@command("reproduce", "print (or --run) the exact commands that rebuild a registered version")
@_configure(_reproduce_args)
def reproduce(args: argparse.Namespace) -> None:
    from fcnseg.reproduce import plan, run_plan
    from fcnseg.runs import project_root

    client = _registry_client(args)
    steps = plan(client, args.model, project_root())
    print(steps.script())
    if args.execute:
        run_plan(steps, project_root())


def _sync_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="the training output dir (artifacts/train, or a Hydra run dir)")
    _tracking_uri_option(p, "the run's own store, else $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db")


@command("sync-run", "log a training run made while MLflow was unreachable (metrics, checkpoint, model)")
@_configure(_sync_run_args)
def sync_run(args: argparse.Namespace) -> None:
    from fcnseg.run_dir import sync_run as sync

    print(f"logged {args.output_dir} as MLflow run {sync(args.output_dir, args.tracking_uri)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcnseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, run) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        configure(sub_parser)
        sub_parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # MLflow's artifact download bars ("Downloading artifacts: 100%") are not this command's output (set it to
    # true to see them)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_user_error():
        args.run(args)


def console_main() -> None:
    """The console script: ``main``, then the exit of a command that succeeded (:mod:`fcnseg.process_exit`)."""
    run_then_exit(main)


if __name__ == "__main__":
    run_then_exit(main)
