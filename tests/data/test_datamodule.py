"""VOCDataModule: batches, whole-image validation padded per batch, worker processes and seeding, DDP validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fcnseg.data import VOCDataModule, VOCSegmentation, pad_collate
from fcnseg.data.classes import NUM_CLASSES, VOC_CLASSES
from fcnseg.errors import DataError
from tests.voc_layout import random_sample, write_voc_layout


def make_datamodule(root: Path, **kwargs) -> VOCDataModule:
    settings = dict(batch_size=2, val_batch_size=3, num_workers=0, pin_memory=False,
                    train_transform={"crop_size": 32, "scale_min": 0.75, "scale_max": 1.25})
    return VOCDataModule(str(root), **(settings | kwargs))


def test_pad_collate_pads_images_with_zero_and_masks_with_void():
    small = (torch.ones(3, 2, 3), torch.full((2, 3), 4, dtype=torch.uint8))
    large = (torch.ones(3, 4, 2), torch.full((4, 2), 5, dtype=torch.uint8))
    images, masks = pad_collate([small, large])
    assert images.shape == (2, 3, 4, 3) and masks.shape == (2, 4, 3) and masks.dtype == torch.uint8
    assert torch.all(images[0, :, :2, :3] == 1) and torch.all(images[0, :, 2:] == 0)  # bottom padding
    assert torch.all(masks[0, :2, :3] == 4) and torch.all(masks[0, 2:] == 255)
    assert torch.all(images[1, :, :, 2] == 0) and torch.all(masks[1, :, 2] == 255)  # right padding


def test_train_and_val_batches(voc_root):
    datamodule = make_datamodule(voc_root)
    datamodule.setup("fit")
    assert datamodule.num_classes == NUM_CLASSES and datamodule.class_names == list(VOC_CLASSES)

    train = datamodule.train_dataloader()
    assert len(train) == 3  # 6 images, batches of 2
    images, masks = next(iter(train))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert masks.shape == (2, 32, 32) and masks.dtype == torch.uint8  # widened on the device, not in the loader

    # validation: whole images of sizes 40x56, 33x47, 50x36, each at its own size (no padding: the model must see
    # each image as `fcnseg evaluate` does)
    images, masks = next(iter(datamodule.val_dataloader()))
    assert [tuple(image.shape) for image in images] == [(3, 40, 56), (3, 33, 47), (3, 50, 36)]
    assert [tuple(mask.shape) for mask in masks] == [(40, 56), (33, 47), (50, 36)]
    _, raw_mask = VOCSegmentation(voc_root, "val")[1]
    assert masks[1].dtype == torch.uint8 and torch.equal(masks[1], torch.from_numpy(raw_mask))


def test_drop_last_keeps_only_full_batches(voc_root):
    datamodule = make_datamodule(voc_root, batch_size=4)
    datamodule.setup("fit")
    assert [len(masks) for _, masks in datamodule.train_dataloader()] == [4]


def test_fewer_images_than_a_batch_is_a_data_error(voc_root):
    datamodule = make_datamodule(voc_root, batch_size=7)
    with pytest.raises(DataError, match="batch_size=7") as info:
        datamodule.setup("fit")
    assert "\n" not in str(info.value) and "6 images" in str(info.value)


def test_too_few_images_per_ddp_process_for_a_batch_is_a_data_error_not_an_empty_run(voc_root):
    # 6 images on 3 processes are 2 each: a batch of 4 would never fill (Lightning would train nothing)
    import lightning as L

    datamodule = make_datamodule(voc_root, batch_size=4)
    datamodule.trainer = L.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False)  # not launched
    with pytest.raises(DataError, match="2 per process over 3 processes") as info:
        datamodule.setup("fit")
    assert "use fewer devices" in str(info.value) and "\n" not in str(info.value)


def test_caffe_normalization_reaches_the_batches(voc_root):
    datamodule = make_datamodule(voc_root, normalization="caffe")
    datamodule.setup("validate")
    images, _ = next(iter(datamodule.val_dataloader()))
    assert images[0].abs().max() > 50  # 0-255 minus mean, not ImageNet-standardised


def test_workers_pickle_and_draw_different_augmentations(tmp_path):
    # Six copies of one image: if the workers' albumentations generators were copies of one state, worker 0's first
    # sample and worker 1's first sample would be the same crop.
    sample = random_sample(np.random.default_rng(0), 40, 48)
    ids = [f"img{i}" for i in range(6)]
    root = write_voc_layout(tmp_path / "VOC2012", {i: sample for i in ids}, {"train": ids, "val": ids[:2]})
    datamodule = make_datamodule(root, batch_size=1, num_workers=2)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches = [images for images, _ in loader]
    assert len(batches) == 6
    assert not torch.equal(batches[0], batches[1])  # batch 0 from worker 0, batch 1 from worker 1
    val_images, _ = next(iter(datamodule.val_dataloader()))
    assert [tuple(image.shape) for image in val_images] == [(3, 40, 48)] * 2


def _validation_ids(rank: int, world_size: int, root: str, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/init", rank=rank, world_size=world_size)
    try:
        datamodule = make_datamodule(Path(root), val_batch_size=1)
        datamodule.setup("validate")
        loader = datamodule.val_dataloader()
        Path(out, f"rank{rank}.json").write_text(json.dumps([datamodule.val_dataset.ids[i] for i in loader.sampler]))
    finally:
        dist.destroy_process_group()


def test_distributed_validation_sees_every_image_once(voc_root, tmp_path):
    import json

    # 3 val images on 2 ranks: a padding sampler would evaluate one image twice. Fork: no re-import, fast.
    mp.start_processes(_validation_ids, args=(2, str(voc_root), str(tmp_path)), nprocs=2, start_method="fork")
    per_rank = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(VOCSegmentation(voc_root, "val").ids)
    assert {len(ids) for ids in per_rank} == {1, 2}
