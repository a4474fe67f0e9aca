"""LightningDataModule for any dataset layout: random crops for training, whole unpadded images for validation.

The dataset (``dataset``: the data config's description, see :mod:`fcnseg.data.dataset_spec`) decides the reader
(``layout``), the label mapping applied before augmentation and the ignore index that pads masks.

Seeding: a training sample's shuffle position and augmentation are functions of ``(seed, epoch, index)`` only
(:class:`~fcnseg.data.samplers.EpochSeededSampler` + :class:`~fcnseg.data.samplers.EpochSeededDataset`), never of
worker or process state, so workers draw distinct augmentations and a resumed run replays exactly. Workers are still
initialised with Lightning's ``pl_worker_init_function`` (per-worker, per-rank global RNG seeds) for user transforms
that draw from NumPy or ``random``.

Distributed validation: under DDP the validation loader gets an :class:`UnpaddedDistributedSampler`, so every
image is evaluated exactly once across ranks. Lightning keeps a sampler that is a ``DistributedSampler`` (sub)class
(``_requires_distributed_sampler`` in Lightning 2.x), so this works with the default
``use_distributed_sampler=True``; Lightning's own would pad with repeated images, which the metrics would count
twice. The training sampler is an ``EpochSeededSampler``, a ``DistributedSampler`` too, so Lightning keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from fcnseg.data.classes import IGNORE_INDEX
from fcnseg.data.dataset_spec import DatasetSpec, dataset_spec
from fcnseg.data.layouts import open_split
from fcnseg.data.reader import LabeledImages
from fcnseg.data.samplers import EpochSeededDataset, EpochSeededSampler, UnpaddedDistributedSampler
from fcnseg.data.transforms import build_eval_transform, build_train_transform
from fcnseg.errors import ConfigError, DataError


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]],
                ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks ``(image 3xHxW, mask HxW)`` pairs of different sizes, padding bottom/right to the batch's largest
    height and width: images with 0 (the normalised input's zero, as the training crops pad), masks with the
    dataset's ``ignore_index`` (255 by default, so loss and metrics ignore the padding). Masks keep their dtype (uint8 from the transforms): the loss and the
    metrics widen them on the device."""
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    if all(image.shape[-2:] == (height, width) for image, _ in batch):  # training crops: nothing to pad
        return torch.stack([image for image, _ in batch]), torch.stack([torch.as_tensor(m) for _, m in batch])
    images, masks = [], []
    for image, mask in batch:
        pad = (0, width - image.shape[-1], 0, height - image.shape[-2])  # (left, right, top, bottom)
        images.append(F.pad(image, pad, value=0.0))
        masks.append(F.pad(torch.as_tensor(mask), pad, value=ignore_index))
    return torch.stack(images), torch.stack(masks)


def unpadded_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Validation batches as lists, each image at its own size: the model sees every image whole and alone, as
    ``fcnseg evaluate`` does, since padding to the batch's largest image changes the scores near the padded edges."""
    return [image for image, _ in batch], [torch.as_tensor(mask) for _, mask in batch]


def _distributed_world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, or (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class SegmentationDataModule(L.LightningDataModule):
    """Train/val loaders over two splits of one dataset ``root``, read by :func:`~fcnseg.data.layouts.open_split`.

    ``dataset``: the dataset's description (``name``, ``class_names``, ``palette``, ``ignore_index``,
    ``label_map``, ``reduce_zero_label``, ``layout``, ``source``, ``folder``: the data config's keys, which
    conf/data/*.yaml pass in); None: PASCAL VOC in the VOC layout.

    ``train_transform`` holds :func:`build_train_transform`'s keyword arguments (``crop_size``, ``scale_min``,
    ``scale_max``, ``hflip``, ``color_jitter``); ``normalization`` must match the backbone (``imagenet`` or
    ``caffe``). ``sbd_root`` is where SBD lives for ``train_split="train_aug"`` (default: next to VOCdevkit).
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "val",
        batch_size: int = 8,
        val_batch_size: int = 4,
        num_workers: int = 4,
        pin_memory: bool = True,
        normalization: str = "imagenet",
        train_transform: dict[str, Any] | None = None,
        seed: int = 0,
        sbd_root: str | None = None,
        dataset: Mapping[str, Any] | DatasetSpec | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise ConfigError(f"batch sizes must be >= 1, got batch_size={batch_size}, val_batch_size={val_batch_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.root = root
        self.train_split = train_split
        self.val_split = val_split
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.normalization = normalization
        self.train_transform = dict(train_transform or {"crop_size": 320})
        self.seed = seed
        self.sbd_root = sbd_root
        if isinstance(dataset, DatasetSpec):
            self.spec = dataset
        else:
            self.spec = dataset_spec(dataset) if dataset else DatasetSpec.from_metadata(None)
        self.num_classes = self.spec.num_classes
        self.class_names: list[str] = list(self.spec.class_names)
        self.train_dataset: LabeledImages | None = None
        self.val_dataset: LabeledImages | None = None

    def _rank(self) -> int:
        trainer = self.trainer
        return trainer.global_rank if trainer is not None else _distributed_world()[1]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            # seed + rank: with num_workers=0 each DDP rank still draws its own augmentations
            transform = build_train_transform(**self.train_transform, normalization=self.normalization,
                                              seed=self.seed + self._rank(), ignore_index=self.spec.ignore_index)
            self.train_dataset = open_split(self.spec, self.train_split, self.root, transform, sbd_root=self.sbd_root)
            # under DDP each process gets its share (the distributed sampler pads it to ceil(n / processes))
            processes = self.trainer.world_size if self.trainer is not None else _distributed_world()[0]
            per_process = -(-len(self.train_dataset) // processes)
            if per_process < self.batch_size:
                share = f", {per_process} per process over {processes} processes," if processes > 1 else ""
                raise DataError(
                    f"split {self.train_split!r} of {self.root} has {len(self.train_dataset)} images{share} fewer "
                    f"than batch_size={self.batch_size}; the training loader drops incomplete batches and would "
                    f"yield none: lower data.datamodule.batch_size{', use fewer devices' if processes > 1 else ''} "
                    "or add images"
                )
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = open_split(self.spec, self.val_split, self.root,
                                          build_eval_transform(self.normalization), sbd_root=self.sbd_root)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": partial(pad_collate, ignore_index=self.spec.ignore_index),
            "worker_init_fn": partial(pl_worker_init_function, rank=self._rank()),
            # Each new loader iterator (fresh workers after a resume, say) draws a base seed; from its own
            # generator, not the global one, so dropout after a resume draws what the uninterrupted run drew.
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        # Shuffle and augmentation are functions of (seed, epoch, index): a resumed run replays them exactly.
        world_size, rank = _distributed_world()
        sampler = EpochSeededSampler(self.train_dataset, num_replicas=world_size, rank=rank, seed=self.seed)
        if self.trainer is not None:
            # Lightning creates the first iterator (whose workers prefetch at once) before it calls set_epoch, so a
            # resumed run would replay epoch 0's order and crops in its first epoch: start at the loop's epoch.
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        # Crops are all crop_size, so pad_collate only stacks; drop_last keeps batch statistics even.
        return DataLoader(EpochSeededDataset(self.train_dataset, self.seed), batch_size=self.batch_size,
                          sampler=sampler, drop_last=True, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        world_size, rank = _distributed_world()
        sampler = None
        if world_size > 1:
            if len(self.val_dataset) < world_size:  # a rank without images would wait forever at the metric sync
                raise DataError(f"split {self.val_split!r} of {self.root} has {len(self.val_dataset)} images, fewer "
                                f"than the {world_size} processes: use fewer devices or a larger validation split")
            sampler = UnpaddedDistributedSampler(self.val_dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False, sampler=sampler,
                          **{**self._loader_kwargs(), "collate_fn": unpadded_collate})


VOCDataModule = SegmentationDataModule  # the name conf/data/voc.yaml and earlier configs instantiate
