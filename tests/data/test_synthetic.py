"""The synthetic dataset: deterministic, in the VOC layout, atomic and idempotent."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.data.classes import IGNORE_INDEX, NUM_CLASSES, voc_palette
from fcnseg.data import synthetic
from fcnseg.data.synthetic import write_synthetic_voc
from fcnseg.errors import DataError

SMALL = dict(num_train=12, num_val=4, height=40, width=48)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_voc(tmp_path_factory.mktemp("synth") / "VOC2012", seed=0, **SMALL)


def test_layout_and_splits(dataset):
    sets = dataset / "ImageSets" / "Segmentation"
    train = (sets / "train.txt").read_text().split()
    val = (sets / "val.txt").read_text().split()
    assert len(train) == 12 and len(val) == 4 and not set(train) & set(val)
    assert (sets / "trainval.txt").read_text().split() == train + val
    for image_id in train + val:
        image = Image.open(dataset / "JPEGImages" / f"{image_id}.jpg")
        label = Image.open(dataset / "SegmentationClass" / f"{image_id}.png")
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (48, 40)
        assert label.mode == "P" and label.size == (48, 40)
        assert np.array_equal(np.asarray(label.getpalette(), dtype=np.uint8).reshape(-1, 3), voc_palette(256))


def test_labels_are_voc_indices_with_void_bands(dataset):
    ids = (dataset / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split()
    labels = np.stack([np.asarray(Image.open(dataset / "SegmentationClass" / f"{i}.png")) for i in ids])
    values = set(np.unique(labels).tolist())
    assert values <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    assert IGNORE_INDEX in values and 0 in values
    # Void is a thin band between regions, not a region: it covers a small share of the pixels.
    assert 0.01 < (labels == IGNORE_INDEX).mean() < 0.3


def test_every_foreground_class_in_train_split(tmp_path):
    root = write_synthetic_voc(tmp_path / "VOC2012", seed=1, num_train=40, num_val=1, height=32, width=32)
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    seen = set()
    for i in ids:
        seen |= set(np.unique(np.asarray(Image.open(root / "SegmentationClass" / f"{i}.png"))).tolist())
    assert set(range(1, NUM_CLASSES)) <= seen


def test_same_seed_same_bytes_other_seed_differs(tmp_path, dataset):
    again = write_synthetic_voc(tmp_path / "a" / "VOC2012", seed=0, **SMALL)
    other = write_synthetic_voc(tmp_path / "b" / "VOC2012", seed=1, **SMALL)
    assert _files(again) == _files(dataset)
    first, second = _files(dataset), _files(other)
    assert first.keys() == second.keys()
    assert first["JPEGImages/synth_000000.jpg"] != second["JPEGImages/synth_000000.jpg"]
    assert first["SegmentationClass/synth_000000.png"] != second["SegmentationClass/synth_000000.png"]


def test_complete_marker_records_params_and_hash(dataset):
    marker = json.loads((dataset / ".complete").read_text())
    assert marker["params"]["seed"] == 0 and marker["params"]["num_train"] == 12
    assert marker["params"]["height"] == 40 and marker["params"]["width"] == 48
    assert len(marker["sha256"]) == 64


def test_idempotent_when_params_match(tmp_path):
    root = write_synthetic_voc(tmp_path / "VOC2012", seed=0, **SMALL)
    sentinel = root / "JPEGImages" / "sentinel.txt"
    sentinel.write_text("untouched")  # a rewrite would drop this file
    assert write_synthetic_voc(root, seed=0, **SMALL) == root
    assert sentinel.exists()


def test_other_params_rewrite_atomically(tmp_path):
    root = write_synthetic_voc(tmp_path / "VOC2012", seed=0, **SMALL)
    (root / "JPEGImages" / "sentinel.txt").write_text("stale")
    write_synthetic_voc(root, seed=0, num_train=5, num_val=2, height=40, width=48)
    assert not (root / "JPEGImages" / "sentinel.txt").exists()
    assert len((root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()) == 5
    assert json.loads((root / ".complete").read_text())["params"]["num_train"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOC2012"]  # no temp or old dirs left behind


def test_incomplete_directory_is_replaced(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)  # e.g. left by an interrupted copy: no .complete marker
    write_synthetic_voc(root, seed=0, **SMALL)
    assert (root / ".complete").exists()
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOC2012"]


def test_interrupted_write_leaves_old_data_and_no_temp_dir(tmp_path, monkeypatch):
    root = write_synthetic_voc(tmp_path / "VOC2012", seed=0, **SMALL)
    before = _files(root)
    real_render = synthetic.render_sample

    def fail_halfway(params, index):
        if index == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing
        return real_render(params, index)

    monkeypatch.setattr(synthetic, "render_sample", fail_halfway)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_voc(root, seed=1, **SMALL)
    assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOC2012"]


def test_bad_arguments_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="num_train"):
        write_synthetic_voc(tmp_path / "VOC2012", num_train=0)
    with pytest.raises(DataError, match="data.synthetic"):
        write_synthetic_voc(tmp_path / "VOC2012", no_such_option=1)
    assert list(tmp_path.iterdir()) == []


def test_held_out_test_split_is_disjoint_and_leaves_train_and_val_unchanged(tmp_path, dataset):
    assert not (dataset / "ImageSets" / "Segmentation" / "test.txt").exists()  # num_test=0: no test split
    root = write_synthetic_voc(tmp_path / "VOC2012", seed=0, num_test=5, **SMALL)
    sets = root / "ImageSets" / "Segmentation"
    train, val, test = ((sets / f"{split}.txt").read_text().split() for split in ("train", "val", "test"))
    assert len(test) == 5 and not set(test) & (set(train) | set(val))
    assert (sets / "trainval.txt").read_text().split() == train + val  # test stays out of trainval
    with_test, without = _files(root), _files(dataset)
    for image_id in train + val:  # adding test images does not redraw the others
        for name in (f"JPEGImages/{image_id}.jpg", f"SegmentationClass/{image_id}.png"):
            assert with_test[name] == without[name]
    for image_id in test:  # real samples, not copies of train/val ones
        assert Image.open(root / "SegmentationClass" / f"{image_id}.png").size == (48, 40)
        assert with_test[f"JPEGImages/{image_id}.jpg"] not in {without[f"JPEGImages/{i}.jpg"] for i in train + val}
    assert json.loads((root / ".complete").read_text())["params"]["num_test"] == 5
    with pytest.raises(DataError, match="num_test"):
        write_synthetic_voc(tmp_path / "bad" / "VOC2012", num_test=-1)


def test_quickstart_data_has_a_held_out_test_split():
    """The quick start scores a split nothing was calibrated or selected on (conf/data/synthetic.yaml)."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("config", overrides=["experiment=quickstart"])
    assert cfg.data.synthetic.num_test > 0 and cfg.data.test_split == "test"
    assert cfg.data.test_split not in (cfg.data.datamodule.train_split, cfg.data.datamodule.val_split)
