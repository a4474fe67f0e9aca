"""SegmentationModule: an FCN with its loss, optimiser and per-epoch metric logging, as a LightningModule."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import hydra.utils
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
import torchmetrics
from torchmetrics import MeanMetric

from fcnseg.data.classes import IGNORE_INDEX, NUM_CLASSES
from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.errors import FcnsegError
from fcnseg.metrics import SCALAR_KEYS, SegmentationMetrics, metric_keys
from fcnseg.models.checkpoint import inference_net_config, load_checkpoint_state, read_checkpoint
from fcnseg.models.weights import NET_PREFIX


NO_FAULT = 2**62  # "no non-finite loss yet": larger than any step, so a min over ranks finds the first fault

# Every value this module logs is already reduced over ranks (below), so Lightning's advice to sync it again is moot.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(train|val)/",
                        category=PossibleUserWarning)


class SegmentationModule(L.LightningModule):
    """Trains an FCN with per-pixel softmax cross-entropy, the dataset's ignore index (VOC's void 255) ignored.

    Distributed training, by design: every cross-rank reduction happens in this module's own epoch-end hooks
    (``on_train_epoch_end``, ``on_validation_epoch_end``), which every rank runs at the same point in the same
    order, through torchmetrics. Lightning is only ever handed finished numbers (``sync_dist`` and metric objects
    are refused by :meth:`log`), so reading logged metrics (a progress bar or logger on rank 0 alone, any callback)
    never issues a collective, and no collective depends on which rank runs which hook.

    Arguments are plain dicts (Hydra config sections) so the checkpoint's hyperparameters rebuild the model
    without any config tree: ``SegmentationModule.load_from_checkpoint(path)``.

    - ``net``: kwargs of ``fcnseg.models.build_fcn`` with ``_target_`` (the ``model.net`` config).
    - ``optim``: ``optimizer`` (a ``_partial_`` optimiser config), ``scheduler`` (null or a ``_partial_`` scheduler
      config, stepped every optimiser step; ``total_iters`` is filled in with the run's total steps),
      ``bias_lr_mult``, ``bias_weight_decay``, ``loss_reduction`` (``mean`` over valid pixels, or the paper's ``sum``).
    - ``normalization``: the input normalisation the weights expect; recorded so inference matches training.
    - ``dataset``: the dataset's metadata (:meth:`fcnseg.data.dataset_spec.DatasetSpec.to_metadata`: name, class
      names, palette, ignore index, source), kept in the checkpoint for everything that predicts; its class names
      name the per-class metrics (``val/iou/<name>``) and its ignore index is the loss's and the metrics'.
      Without it (older checkpoints), ``num_classes``, ``ignore_index`` and ``class_names`` describe the classes.
    - Speed (the ``training`` config section): ``train_metrics_every_n_steps`` (training metrics from 1 step in n;
      0: off), ``nonfinite_check_every_n_steps`` (how often the loss's finiteness reaches the host; also at each
      epoch's last batch; 0: never), ``channels_last`` (``auto``: on CUDA), ``compile`` (``torch.compile`` the
      training forward).
    """

    def __init__(
        self,
        net: dict[str, Any],
        optim: dict[str, Any] | None = None,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        normalization: str = "imagenet",
        class_names: list[str] | None = None,
        train_metrics_every_n_steps: int = 10,
        nonfinite_check_every_n_steps: int = 10,
        channels_last: bool | str = "auto",
        compile: bool = False,
        dataset: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key, value in (("train_metrics_every_n_steps", train_metrics_every_n_steps),
                           ("nonfinite_check_every_n_steps", nonfinite_check_every_n_steps)):
            if int(value) < 0:
                raise FcnsegError(f"training.{key} must be >= 0 (0: off), got {value}")
        if channels_last not in (True, False, "auto"):
            raise FcnsegError(f"training.channels_last must be true, false or auto, got {channels_last!r}")
        self.net = hydra.utils.instantiate(net)
        self.dataset = DatasetSpec.from_metadata(dataset, num_classes, class_names)
        if dataset is not None and dataset.get("ignore_index") is not None:
            ignore_index = int(dataset["ignore_index"])
        if self.dataset.num_classes != num_classes:
            raise FcnsegError(f"the dataset names {self.dataset.num_classes} classes "
                              f"({', '.join(self.dataset.class_names[:5])}, ...) but the module has num_classes="
                              f"{num_classes}; let num_classes follow from data.class_names")
        self.class_names = list(self.dataset.class_names)
        self.ignore_index = ignore_index
        self._metric_keys = metric_keys(self.class_names)  # val/iou/<name>, made valid MLflow metric names
        reduction = (optim or {}).get("loss_reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise FcnsegError(f"optim.loss_reduction must be 'mean' or 'sum', got {reduction!r}")
        self.criterion = nn.CrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)
        self.train_metrics = SegmentationMetrics(num_classes, ignore_index=ignore_index)
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index=ignore_index)
        # Loss means over all ranks, accumulated on the device (no per-step sync); non-finite losses are caught by
        # the fault check, so the metric need not look for NaNs (which would cost a host sync per step).
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.last_val_results: dict[str, Any] | None = None  # read by tracking callbacks (confusion matrix plot)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    # --- placement and speed (GPU) ---------------------------------------------------------------------------------
    def _channels_last(self) -> bool:
        setting = self.hparams.get("channels_last", "auto")
        return self.device.type == "cuda" if setting == "auto" else bool(setting)

    def on_fit_start(self) -> None:
        # NHWC suits tensor-core convolutions; the weights keep their values (checkpoints load either way)
        if self._channels_last():
            self.net.to(memory_format=torch.channels_last)
        # In __dict__, not a child module, so checkpoints keep the plain `net.*` keys. Training crops have one
        # size; validation (whole images of many sizes) stays eager rather than recompiling per size.
        self.__dict__["_train_forward"] = torch.compile(self.net) if self.hparams.get("compile", False) else self.net
        # The first non-finite step, kept on the device: checking it needs a host sync, done only every n steps.
        self._first_nonfinite_step = torch.full((), NO_FAULT, dtype=torch.long, device=self.device)

    def _to_memory_format(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self._channels_last() else images

    # --- training ----------------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, masks = batch
        forward = getattr(self, "_train_forward", self.net)
        logits = forward(self._to_memory_format(images))
        loss = self.criterion(logits.float(), masks.long())
        self._note_nonfinite(loss)
        every = int(self.hparams.get("train_metrics_every_n_steps", 1))
        if every and batch_idx % every == 0:  # an estimate of the training fit: argmax + bincount on 1 step in n
            self.train_metrics.update(logits.detach(), masks)
        self.train_loss.update(loss.detach(), weight=images.shape[0])
        # This rank's batch loss, for the loggers every log_every_n_steps; the epoch's mean over all ranks is
        # logged at the epoch's end. Not on the progress bar per step: a copy to the host (a sync) every step.
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, batch_size=images.shape[0])
        return loss

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        if not hasattr(self, "_first_nonfinite_step"):  # called outside fit (tests, manual loops)
            self._first_nonfinite_step = torch.full((), NO_FAULT, dtype=torch.long, device=loss.device)
        first = self._first_nonfinite_step
        bad = ~torch.isfinite(loss.detach()) & (first == NO_FAULT)
        self._first_nonfinite_step = torch.where(bad, torch.full_like(first, self.global_step), first)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = int(self.hparams.get("nonfinite_check_every_n_steps", 1))
        # Every n steps and at each epoch's last batch (and before each validation, below), so neither validation
        # nor a checkpoint ever sees weights a non-finite step produced.
        if every and ((batch_idx + 1) % every == 0 or self.trainer.is_last_batch):
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        # The earliest over ranks, so a fault on one rank stops every rank here with the same message.
        first = int(self.trainer.strategy.reduce(self._first_nonfinite_step.clone(), reduce_op="min"))
        if first != NO_FAULT:
            self._stop_on_non_finite(first)

    def _stop_on_non_finite(self, step: int) -> None:
        callbacks = getattr(self._trainer, "checkpoint_callbacks", None) or []
        paths = [path for cb in callbacks for path in (cb.last_model_path, cb.best_model_path) if path]
        last_good = next((path for path in paths if Path(path).name == "last.ckpt"), paths[0] if paths else "")
        where = f"last good checkpoint kept at {last_good}" if last_good else "no checkpoint was written yet"
        raise FcnsegError(
            f"non-finite training loss at step {step} (epoch {self.current_epoch}); "
            f"{where}; lower optim.lr or check the data, then resume with ckpt_path=<checkpoint>"
        )

    def on_train_epoch_end(self) -> None:
        # every rank, in this order: the loss mean, then the confusion matrix, each reduced over ranks
        loss = self.train_loss.compute()
        results = self.train_metrics.compute()
        self.log("train/loss_epoch", loss)
        self._log_metrics("train", results, per_class=False)
        self.train_loss.reset()
        self.train_metrics.reset()

    # --- validation: each image whole and alone, as `fcnseg evaluate` and the paper's scorer see it -----------------
    def validation_step(self, batch, batch_idx: int) -> None:
        images, masks = batch  # lists of differently sized images (unpadded_collate), or stacked equal sizes
        for image, mask in zip(images, masks):
            logits = self.net(self._to_memory_format(image[None])).float()
            target = mask[None].long()
            valid = (target != self.ignore_index).sum().clamp(min=1)  # stays on the device: no sync
            # val/loss: the mean over images (of all ranks) of each image's per-pixel loss
            self.val_loss.update(F.cross_entropy(logits, target, ignore_index=self.ignore_index,
                                                 reduction="sum") / valid)
            self.val_metrics.update(logits, target)

    def on_validation_epoch_start(self) -> None:
        # a validation inside a training epoch (val_check_interval) must not score weights a bad step made
        if self.trainer.training and hasattr(self, "_first_nonfinite_step"):
            self._check_nonfinite()
        # Whole images come in many sizes: cuDNN autotuning (trainer.benchmark) would re-tune for each new one.
        self._cudnn_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False

    def on_validation_epoch_end(self) -> None:
        torch.backends.cudnn.benchmark = self._cudnn_benchmark
        # every rank, in this order: the loss mean, then the confusion matrix, each reduced over ranks
        loss = self.val_loss.compute()
        results = self.val_metrics.compute()
        self.last_val_results = results
        self.log("val/loss", loss)
        self._log_metrics("val", results, per_class=True)
        self.val_loss.reset()
        self.val_metrics.reset()

    def _log_metrics(self, stage: str, results: dict[str, Any], per_class: bool) -> None:
        scalars = {f"{stage}/{key}": float(results[key]) for key in SCALAR_KEYS}
        if per_class:
            for key, iou in zip(self._metric_keys, results["per_class_iou"].tolist()):
                if iou == iou:  # classes absent from both truth and prediction have no IoU (nan): skip them
                    scalars[f"{stage}/iou/{key}"] = iou
        # torchmetrics already summed the confusion matrix over ranks: every rank logs the same, final values
        mean_iou = scalars.pop(f"{stage}/mean_iou")
        self.log_dict(scalars)
        self.log(f"{stage}/mean_iou", mean_iou, prog_bar=True)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``, for values that are already final on every rank (see the class docstring).

        A value Lightning would reduce itself (``sync_dist=True``, or a torchmetrics object it computes when the
        value is first read) is refused: that reduction is a collective run by whichever rank reads the metrics
        first, e.g. the progress bar, which only rank 0 has, and the ranks' collectives would stop pairing.
        """
        sync_dist = _LOG_SIGNATURE.bind(self, name, value, *args, **kwargs).arguments.get("sync_dist", False)
        if sync_dist or isinstance(value, torchmetrics.Metric):
            raise FcnsegError(
                f"self.log({name!r}, ...) asks Lightning to reduce the value across ranks when it is read; reduce it "
                f"in an epoch-end hook every rank runs (a torchmetrics metric's compute()) and log the result instead"
            )
        super().log(name, value, *args, **kwargs)

    def configure_optimizers(self):
        optim = self.hparams.optim
        if not optim:
            raise FcnsegError("this module was rebuilt for inference (its checkpoint has no optim config); train "
                              "from a training checkpoint or give SegmentationModule an optim config")
        lr = float(optim["optimizer"]["lr"])
        weights, biases = [], []
        for name, param in self.net.named_parameters():
            if param.requires_grad:  # fixed bilinear upsamplers stay out of the optimiser
                (biases if name.endswith(".bias") else weights).append(param)
        groups = [{"params": weights}]
        if biases:  # the paper: biases learn at twice the rate, without weight decay
            groups.append({
                "params": biases,
                "lr": lr * float(optim.get("bias_lr_mult", 2.0)),
                "weight_decay": float(optim.get("bias_weight_decay", 0.0)),
            })
        make_optimizer = hydra.utils.instantiate(optim["optimizer"])
        optimizer = make_optimizer(groups, **self._fused_kwargs(make_optimizer, optim["optimizer"]))
        scheduler_cfg = optim.get("scheduler")
        if not scheduler_cfg:
            return optimizer
        make_scheduler = hydra.utils.instantiate(scheduler_cfg)  # a `_partial_` scheduler, e.g. PolynomialLR
        kwargs = {}
        if "total_iters" in inspect.signature(getattr(make_scheduler, "func", make_scheduler)).parameters:
            kwargs["total_iters"] = self.trainer.estimated_stepping_batches  # schedules that run to the end
        scheduler = make_scheduler(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_kwargs(self, make_optimizer, config: dict[str, Any]) -> dict[str, bool]:
        """On CUDA, one fused kernel for the whole update instead of a launch per tensor (SGD, Adam, AdamW), unless
        the config chose ``fused``/``foreach`` itself."""
        if self.device.type != "cuda" or "fused" in config or "foreach" in config:
            return {}
        optimizer_class = getattr(make_optimizer, "func", make_optimizer)
        return {"fused": True} if optimizer_class in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) else {}


_LOG_SIGNATURE = inspect.signature(L.LightningModule.log)


def load_module(checkpoint_path: str | Path, map_location: str | torch.device = "cpu") -> SegmentationModule:
    """Rebuilds a SegmentationModule from an fcnseg checkpoint (a training one, or weights only), ready for inference
    (eval mode). The backbone is not re-fetched: the checkpoint holds all trained weights."""
    checkpoint = read_checkpoint(checkpoint_path)
    hparams = checkpoint["hyper_parameters"]
    module = SegmentationModule(**{**hparams, "net": {"_target_": "fcnseg.models.build_fcn",
                                                      **inference_net_config(checkpoint)}})
    load_checkpoint_state(module, {key: value for key, value in checkpoint["state_dict"].items()
                                   if key.startswith(NET_PREFIX)}, checkpoint_path)
    module.to(map_location)
    return module.eval()
