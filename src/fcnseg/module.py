"""SegmentationModule: an FCN with its loss, optimiser and per-epoch metric logging, as a LightningModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra.utils
import lightning as L
import torch
from torch import nn

from fcnseg.data.classes import IGNORE_INDEX, VOC_CLASSES
from fcnseg.errors import FcnsegError
from fcnseg.metrics import SegmentationMetrics
from fcnseg.models.weights import load_checkpoint_state, read_fcnseg_checkpoint


def poly_schedule(total_steps: int, power: float = 0.9):
    """The poly learning-rate policy: lr * (1 - step / total_steps) ** power."""
    total_steps = max(int(total_steps), 1)
    return lambda step: max(0.0, 1.0 - step / total_steps) ** power


class SegmentationModule(L.LightningModule):
    """Trains an FCN with per-pixel softmax cross-entropy, void (255) ignored.

    Arguments are plain dicts (Hydra config sections) so the checkpoint's hyperparameters rebuild the model
    without any config tree: ``SegmentationModule.load_from_checkpoint(path)``.

    - ``net``: kwargs of ``fcnseg.models.build_fcn`` with ``_target_`` (the ``model.net`` config).
    - ``optim``: ``optimizer`` (a ``_partial_`` optimiser config), ``scheduler`` (null or ``{name: poly, power}``),
      ``bias_lr_mult``, ``bias_weight_decay``, ``loss_reduction`` (``mean`` over valid pixels, or the paper's ``sum``).
    - ``normalization``: the input normalisation the weights expect; recorded so inference matches training.
    """

    def __init__(
        self,
        net: dict[str, Any],
        optim: dict[str, Any],
        num_classes: int = len(VOC_CLASSES),
        ignore_index: int = IGNORE_INDEX,
        normalization: str = "imagenet",
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = hydra.utils.instantiate(net)
        self.class_names = list(class_names or VOC_CLASSES[:num_classes])
        reduction = optim.get("loss_reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise FcnsegError(f"optim.loss_reduction must be 'mean' or 'sum', got {reduction!r}")
        self.criterion = nn.CrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)
        self.train_metrics = SegmentationMetrics(num_classes, ignore_index=ignore_index)
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index=ignore_index)
        self.last_val_results: dict[str, Any] | None = None  # read by tracking callbacks (confusion matrix plot)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = batch
        logits = self(images)
        loss = self.criterion(logits.float(), masks.long())
        return loss, logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits = self._shared_step(batch)
        if not torch.isfinite(loss):
            self._stop_on_non_finite(loss)
        self.train_metrics.update(logits.detach(), batch[1])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def _stop_on_non_finite(self, loss: torch.Tensor) -> None:
        callbacks = getattr(self._trainer, "checkpoint_callbacks", None) or []
        paths = [path for cb in callbacks for path in (cb.last_model_path, cb.best_model_path) if path]
        last_good = next((path for path in paths if Path(path).name == "last.ckpt"), paths[0] if paths else "")
        where = f"last good checkpoint kept at {last_good}" if last_good else "no checkpoint was written yet"
        raise FcnsegError(
            f"non-finite training loss ({loss.item()}) at step {self.global_step} (epoch {self.current_epoch}); "
            f"{where}; lower optim.optimizer.lr or check the data, then resume with ckpt_path=<checkpoint>"
        )

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train", self.train_metrics.compute(), per_class=False)
        self.train_metrics.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits = self._shared_step(batch)
        self.val_metrics.update(logits, batch[1])
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch[0].shape[0])

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()  # the confusion matrix is summed over ranks here
        self.last_val_results = results
        self._log_metrics("val", results, per_class=True)
        self.val_metrics.reset()

    def _log_metrics(self, stage: str, results: dict[str, Any], per_class: bool) -> None:
        # Values are already reduced over all ranks by torchmetrics, so no sync_dist here.
        scalars = {f"{stage}/{key}": float(results[key]) for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou")}
        if per_class:
            for name, iou in zip(self.class_names, results["per_class_iou"].tolist()):
                if iou == iou:  # classes absent from both truth and prediction have no IoU (nan): skip them
                    scalars[f"{stage}/iou/{name}"] = iou
        mean_iou = scalars.pop(f"{stage}/mean_iou")
        self.log_dict(scalars, prog_bar=False)
        self.log(f"{stage}/mean_iou", mean_iou, prog_bar=True)

    def configure_optimizers(self):
        optim = self.hparams.optim
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
        optimizer = hydra.utils.instantiate(optim["optimizer"])(groups)
        scheduler_cfg = optim.get("scheduler")
        if not scheduler_cfg:
            return optimizer
        if scheduler_cfg.get("name") != "poly":
            raise FcnsegError(f"unknown optim.scheduler.name {scheduler_cfg.get('name')!r}; use 'poly' or null")
        schedule = poly_schedule(self.trainer.estimated_stepping_batches, float(scheduler_cfg.get("power", 0.9)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_module(checkpoint_path: str | Path, map_location: str | torch.device = "cpu") -> SegmentationModule:
    """Rebuilds a trained SegmentationModule from a Lightning checkpoint, ready for inference (eval mode).

    The backbone is not re-fetched (``backbone_weights=None``): the checkpoint holds all trained weights.
    """
    checkpoint = read_fcnseg_checkpoint(checkpoint_path)
    hparams = checkpoint["hyper_parameters"]
    module = SegmentationModule(**{**hparams, "net": {**hparams["net"], "backbone_weights": None}})
    load_checkpoint_state(module, checkpoint["state_dict"], checkpoint_path)
    module.to(map_location)
    return module.eval()
