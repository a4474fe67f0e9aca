"""SegmentationModule: the loss ignores void, the paper's optimiser groups, the poly schedule, checkpoint loading."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fcnseg.errors import CheckpointError, FcnsegError
from fcnseg.module import SegmentationModule, load_module

NET = {"_target_": "fcnseg.models.build_fcn", "name": "fcn8s", "num_classes": 21, "width": 0.0625,
       "backbone_weights": None, "learnable_upsampling": False}
SGD = {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01, "momentum": 0.9,
                     "weight_decay": 5e-4},
       "scheduler": None, "bias_lr_mult": 2.0, "bias_weight_decay": 0.0, "loss_reduction": "mean"}


def make_module(**optim_overrides) -> SegmentationModule:
    return SegmentationModule(net=dict(NET), optim={**SGD, **optim_overrides})


def test_loss_ignores_void_pixels():
    module = make_module()
    logits = torch.randn(1, 21, 4, 4)
    target = torch.randint(0, 21, (1, 4, 4))
    voided = target.clone()
    voided[0, :2] = 255
    expected = torch.nn.functional.cross_entropy(logits[0, :, 2:].reshape(21, -1).T, target[0, 2:].reshape(-1))
    assert torch.allclose(module.criterion(logits, voided), expected)


def test_uint8_masks_from_the_loader_give_the_same_loss_and_metrics_as_int64():
    module = make_module().eval()
    images = torch.randn(2, 3, 24, 20)
    masks = torch.randint(0, 21, (2, 24, 20), dtype=torch.uint8)
    masks[:, :3] = 255
    with torch.no_grad():
        logits = module(images)
        loss_u8 = module.training_step((images, masks), 0)
        loss_i64 = module.training_step((images, masks.long()), 0)
    assert torch.equal(loss_u8, loss_i64)
    module.val_metrics.update(logits, masks)
    from_u8 = module.val_metrics.compute()["confusion_matrix"].clone()
    module.val_metrics.reset()
    module.val_metrics.update(logits, masks.long())
    assert torch.equal(from_u8, module.val_metrics.compute()["confusion_matrix"]) and int(from_u8.sum()) == 2 * 21 * 20


def test_summed_loss_is_the_papers_unnormalised_sum():
    mean, summed = make_module().criterion, make_module(loss_reduction="sum").criterion
    logits, target = torch.randn(2, 21, 3, 5), torch.randint(0, 21, (2, 3, 5))
    target[0, 0, 0] = 255
    assert torch.allclose(summed(logits, target), mean(logits, target) * 29)


def test_bad_loss_reduction_is_refused():
    with pytest.raises(FcnsegError, match="loss_reduction"):
        make_module(loss_reduction="median")


def test_biases_learn_at_twice_the_rate_without_weight_decay_and_upsampling_stays_fixed():
    module = make_module()
    optimizer = module.configure_optimizers()
    weights, biases = optimizer.param_groups
    assert weights["lr"] == 0.01 and weights["weight_decay"] == 5e-4
    assert biases["lr"] == 0.02 and biases["weight_decay"] == 0.0
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(module.net.upscore8.weight) not in optimised  # fixed bilinear upsampling
    assert all(p.ndim == 1 for p in biases["params"])


def test_poly_schedule_runs_torchs_polynomial_lr_over_the_runs_total_steps(voc_root):
    from fcnseg.data import VOCDataModule

    poly = {"_target_": "torch.optim.lr_scheduler.PolynomialLR", "_partial_": True, "power": 0.9}
    module = make_module(scheduler=poly)
    datamodule = VOCDataModule(str(voc_root), batch_size=2, val_batch_size=2, num_workers=0,
                               train_transform={"crop_size": 32})
    trainer = L.Trainer(max_epochs=2, limit_val_batches=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)  # 6 images, batch 2: 3 steps per epoch, 6 in all
    scheduler = trainer.lr_scheduler_configs[0]
    assert isinstance(scheduler.scheduler, torch.optim.lr_scheduler.PolynomialLR) and scheduler.interval == "step"
    assert scheduler.scheduler.total_iters == 6
    weights, biases = trainer.optimizers[0].param_groups
    assert weights["lr"] == 0.0 and biases["lr"] == 0.0  # (1 - 6/6) ** 0.9: the schedule ran to its end
    assert scheduler.scheduler.base_lrs == [0.01, 0.02]  # biases keep their 2x


def test_non_finite_loss_stops_with_one_line_naming_the_step():
    module = make_module()
    with pytest.raises(FcnsegError) as info:
        module._stop_on_non_finite(0)
    message = str(info.value)
    assert "\n" not in message and "step 0" in message and "non-finite" in message


def _save_lightning_checkpoint(module: SegmentationModule, path) -> None:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


def test_load_module_round_trip(tmp_path):
    module = make_module().eval()
    with torch.no_grad():
        module.net.score_fr.weight.normal_()
    path = tmp_path / "model.ckpt"
    _save_lightning_checkpoint(module, path)
    loaded = load_module(path)
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))
    assert loaded.hparams.normalization == "imagenet"


def test_corrupt_foreign_and_missing_checkpoints_give_one_clear_line(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x80\x04not a checkpoint at all")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)

    class Evil:  # a pickle that would run code on load: weights_only=True must refuse it
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Evil()}, evil)
    for path, needle in ((corrupt, "cannot read"), (foreign, "not an fcnseg"), (evil, "cannot read"),
                         (tmp_path / "missing.ckpt", "not found")):
        with pytest.raises(CheckpointError) as info:
            load_module(path)
        assert needle in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)
