"""The layout readers for your own data (folder, Cityscapes, ADE20K): files found, labels mapped to training ids,
bad labels refused in one line, the deterministic split, and the datamodule on top (padding with the ignore index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from fcnseg.config import CONFIG_DIR
from fcnseg.data import open_split
from fcnseg.data.dataset_spec import dataset_spec
from fcnseg.data.folder import ratio_split
from fcnseg.errors import ConfigError, DataError
from tests.own_data import (CITYSCAPES_CLASSES, CITYSCAPES_TRAIN_IDS, TINY_DATAMODULE, write_ade20k_dataset,
                            write_cityscapes_dataset, write_folder_dataset)


def data_config(overrides: list[str]) -> dict:
    """The ``data`` group exactly as Hydra composes it from conf/ (what training and DVC see)."""
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg.data, resolve=True)


def assert_reads_expected(data, cfg: dict) -> None:
    for split, ids in data.splits.items():
        dataset = open_split(cfg, split)
        assert dataset.ids == ids
        for index, image_id in enumerate(dataset.ids):
            image, mask = dataset[index]
            expected = data.labels[image_id]
            assert image.shape == (*expected.shape, 3) and mask.dtype == np.uint8
            np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("mask_mode", ["P", "L"])
def test_folder_layout_with_split_lists_three_classes(tmp_path, mask_mode):
    data = write_folder_dataset(tmp_path / "own", mask_mode=mask_mode)
    cfg = data_config(data.overrides)
    spec = dataset_spec(cfg)
    assert spec.class_names == ("background", "road", "car") and spec.num_classes == 3 and spec.layout == "folder"
    assert_reads_expected(data, cfg)


def test_folder_layout_two_classes_without_split_lists_is_split_by_fraction_and_seed(tmp_path):
    data = write_folder_dataset(tmp_path / "own", num_classes=2, num_train=8, num_val=2, split_files=False)
    cfg = data_config([*data.overrides, "data.folder.val_fraction=0.25", "data.folder.split_seed=3"])
    train, val = open_split(cfg, "train"), open_split(cfg, "val")
    stems = data.splits["all"]
    assert len(val) == 2 and sorted(train.ids + val.ids) == stems and not set(train.ids) & set(val.ids)
    assert (train.ids, val.ids) == (ratio_split(stems, 0.25, 3)["train"], ratio_split(stems, 0.25, 3)["val"])
    # deterministic in the stems and the seed: the same on another call, another seed gives another split
    assert open_split(cfg, "val").ids == val.ids
    seeds = {tuple(ratio_split(stems, 0.25, seed)["val"]) for seed in range(6)}
    assert len(seeds) > 1
    for index, image_id in enumerate(val.ids):
        np.testing.assert_array_equal(val[index][1], data.labels[image_id])


def test_hash_split_ignores_file_order():
    stems = [f"img{i}" for i in range(20)]
    assert ratio_split(stems, 0.2, 0) == ratio_split(list(reversed(stems)), 0.2, 0)
    assert len(ratio_split(stems, 0.2, 0)["val"]) == 4


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path):
    data = write_cityscapes_dataset(tmp_path / "cityscapes")
    cfg = data_config(data.overrides)
    spec = dataset_spec(cfg)
    assert list(spec.class_names) == CITYSCAPES_CLASSES and spec.num_classes == 19
    assert spec.label_map == CITYSCAPES_TRAIN_IDS  # the official table, written out independently in the test helper
    assert spec.palette[0].tolist() == [128, 64, 128] and spec.palette[13].tolist() == [0, 0, 142]  # road, car
    stored = np.asarray(Image.open(data.masks[data.splits["train"][0]]))
    assert stored.max() > 18  # labelIds, not train ids, on disk
    assert_reads_expected(data, cfg)


def test_ade20k_reduce_zero_label_150_classes(tmp_path):
    data = write_ade20k_dataset(tmp_path / "ADEChallengeData2016")
    cfg = data_config(data.overrides)
    assert dataset_spec(cfg).num_classes == 150 and cfg["reduce_zero_label"] is True
    assert_reads_expected(data, cfg)
    seen = np.unique(np.concatenate([open_split(cfg, "training")[i][1].ravel() for i in range(5)]))
    assert seen.tolist() == [*range(150), 255]  # every class, 149 included; 0 ("other") ignored
    assert open_split(cfg, "val").ids == data.splits["validation"]  # train/val name training/validation


def test_label_outside_the_classes_names_file_values_and_config_key(tmp_path):
    data = write_folder_dataset(tmp_path / "own")
    bad = data.masks["scene_004"]
    values = np.asarray(Image.open(bad)).copy()
    values[0, :2] = (3, 7)
    Image.fromarray(values, mode="L").save(bad)
    dataset = open_split(data_config(data.overrides), "val")
    with pytest.raises(DataError) as err:
        dataset[0]
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "[3, 7]" in message
    assert "data.class_names" in message and "data.ignore_index" in message and "0..2" in message


def test_ade20k_label_above_150_names_reduce_zero_label(tmp_path):
    data = write_ade20k_dataset(tmp_path / "ADEChallengeData2016", num_train=1, num_val=1)
    bad = data.masks[data.splits["validation"][0]]
    values = np.asarray(Image.open(bad)).copy()
    values[0, 0] = 200
    Image.fromarray(values, mode="L").save(bad)
    with pytest.raises(DataError) as err:
        open_split(data_config(data.overrides), "validation")[0]
    message = str(err.value)
    assert str(bad) in message and "[200]" in message and "[199]" in message and "data.reduce_zero_label" in message


def test_rgb_mask_is_refused_in_one_line(tmp_path):
    data = write_folder_dataset(tmp_path / "own")
    mask = data.masks["scene_000"]
    Image.open(mask).convert("RGB").save(mask)
    with pytest.raises(DataError, match="mode-RGB.*palette \\(P\\) or grayscale \\(L\\)"):
        open_split(data_config(data.overrides), "train")[0]


def test_folder_layout_problems_are_one_line(tmp_path):
    data = write_folder_dataset(tmp_path / "own")
    cfg = data_config(data.overrides)
    (data.masks["scene_001"]).unlink()
    with pytest.raises(DataError, match="scene_001.jpg has no mask .*scene_001.png"):
        open_split(cfg, "train")
    with pytest.raises(DataError, match="own/images/images does not exist; the folder layout needs"):
        open_split({**cfg, "root": str(tmp_path / "own" / "images")}, "train")
    with pytest.raises(ConfigError, match="names no classes: set data.class_names"):
        open_split(data_config(["data=folder", f"data.root={data.root}"]), "train")


def test_split_list_entries_may_be_file_names(tmp_path):
    data = write_folder_dataset(tmp_path / "own")
    (data.root / "splits" / "val.txt").write_text("images/scene_004.jpg\nscene_005.png\n")
    assert open_split(data_config(data.overrides), "val").ids == ["scene_004", "scene_005"]


def test_missing_split_file_lists_the_available_ones(tmp_path):
    data = write_folder_dataset(tmp_path / "own")
    with pytest.raises(DataError, match="splits/test.txt does not exist; available splits: train, val"):
        open_split(data_config(data.overrides), "test")


def test_datamodule_pads_with_the_datasets_ignore_index(tmp_path):
    """Training crops larger than the images pad masks with the spec's ignore index (here 7, not 255), and the
    validation loader keeps each image at its size."""
    data = write_folder_dataset(tmp_path / "own", num_classes=2)
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("config", overrides=[*data.overrides, *TINY_DATAMODULE, "data.ignore_index=7",
                                           "data.datamodule.train_transform.crop_size=64",
                                           "data.datamodule.train_transform.scale_min=1.0",
                                           "data.datamodule.train_transform.scale_max=1.0"])
    from hydra.utils import instantiate

    # the helper's labels use 255 for their band: with ignore_index=7 the band is out of range, so rewrite it
    for stem, path in data.masks.items():
        values = np.asarray(Image.open(path)).copy()
        values[values == 255] = 7
        Image.fromarray(values, mode="L").save(path)
    datamodule = instantiate(cfg.data.datamodule)
    assert datamodule.num_classes == 2 and datamodule.class_names == ["thing0", "thing1"]
    datamodule.setup("fit")
    images, masks = next(iter(datamodule.train_dataloader()))
    assert images.shape[-2:] == (64, 64)
    assert set(np.unique(masks.numpy()).tolist()) <= {0, 1, 7} and (masks == 7).float().mean() > 0.5
    val_images, val_masks = next(iter(datamodule.val_dataloader()))
    assert [tuple(m.shape) for m in val_masks] == [data.labels[i].shape for i in data.splits["val"]]


def test_voc_config_describes_voc_and_old_style_num_classes_is_checked():
    cfg = data_config([])
    spec = dataset_spec(cfg)
    assert spec.is_voc and spec.layout == "voc" and spec.ignore_index == 255 and spec.palette[15].tolist() == \
        [192, 128, 128]
    with pytest.raises(ConfigError, match="data.num_classes=3 but data.class_names lists 21"):
        dataset_spec(data_config(["data.num_classes=3"]))


def test_metadata_carries_layout_and_label_mapping(tmp_path):
    from fcnseg.data.dataset_spec import DatasetSpec
    import json

    spec = dataset_spec(data_config(["data=cityscapes"]))
    back = DatasetSpec.from_metadata(json.loads(json.dumps(spec.to_metadata())))
    assert back.label_map == spec.label_map and back.layout == "cityscapes" and back.class_names == spec.class_names
    data = write_cityscapes_dataset(tmp_path / "cs", num_train=1, num_val=1)
    np.testing.assert_array_equal(open_split(back, "val", root=data.root)[0][1], data.labels[data.splits["val"][0]])
    folder = dataset_spec(data_config(["data=folder", "data.class_names=[a,b]", "data.folder.split_seed=5"]))
    assert DatasetSpec.from_metadata(folder.to_metadata()).layout_options["split_seed"] == 5
    old = DatasetSpec.from_metadata({"class_names": ["a", "b"]})  # written before layouts existed: VOC layout
    assert old.layout == "voc" and old.label_map is None and not old.reduce_zero_label


def test_voc_reader_keeps_its_contract(voc_root):
    from fcnseg.data import VOCSegmentation

    image, mask = VOCSegmentation(voc_root, "val")[0]
    assert image.dtype == np.uint8 and mask.dtype == np.uint8 and set(np.unique(mask)) <= set(range(21)) | {255}
    assert Path(voc_root).is_dir()
