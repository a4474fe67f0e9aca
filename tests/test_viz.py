"""Visualisation: VOC palette PNGs that VOC tools read back, overlays with a legend, grids and metric plots."""

import io

import numpy as np
import pytest
from PIL import Image

from fcnseg import viz
from fcnseg.data.classes import VOC_CLASSES
from fcnseg.data.voc import save_label_png


@pytest.fixture
def label_map() -> np.ndarray:
    labels = np.zeros((12, 16), dtype=np.uint8)
    labels[2:6, 3:9] = 1  # aeroplane
    labels[7:11, 8:14] = 15  # person
    labels[6, :] = 255  # void band
    return labels


def test_colorize_uses_voc_colours(label_map):
    rgb = viz.colorize(label_map)
    assert rgb.shape == (12, 16, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    assert tuple(rgb[3, 4]) == (128, 0, 0)
    assert tuple(rgb[8, 10]) == (192, 128, 128)
    assert tuple(rgb[6, 0]) == (224, 224, 192)


def test_colorize_refuses_values_that_are_not_labels():
    with pytest.raises(ValueError, match="label values"):
        viz.colorize(np.array([[0, 300]]))


def test_label_png_round_trip(label_map, tmp_path):
    path = tmp_path / "nested" / "mask.png"
    save_label_png(label_map.astype(np.int64), path)
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), label_map)  # indices back, 255 included
        palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert len(palette) == 256
    # VOC's bit-interleaved colour map: a few entries written out
    assert tuple(palette[1]) == (128, 0, 0)
    assert tuple(palette[2]) == (0, 128, 0)
    assert tuple(palette[15]) == (192, 128, 128)
    assert tuple(palette[20]) == (0, 64, 128)
    assert tuple(palette[255]) == (224, 224, 192)


def test_label_png_to_buffer(label_map):
    buffer = io.BytesIO()
    save_label_png(label_map, buffer)
    buffer.seek(0)
    np.testing.assert_array_equal(np.asarray(Image.open(buffer)), label_map)


def test_overlay_keeps_the_image_and_adds_a_legend(label_map):
    image = np.full((12, 16, 3), 100, dtype=np.uint8)
    plain = viz.overlay(image, label_map, alpha=0.5, legend=False)
    assert plain.shape == image.shape and plain.dtype == np.uint8
    assert tuple(plain[0, 0]) == (100, 100, 100)  # background left as the photo
    assert tuple(plain[3, 4]) == (114, 50, 50)  # half aeroplane red: (100 + 128) / 2, 100 / 2, 100 / 2
    with_legend = viz.overlay(image, label_map, alpha=0.5)
    assert with_legend.shape[1] > 16 and with_legend.shape[2] == 3 and with_legend.dtype == np.uint8
    np.testing.assert_array_equal(with_legend[:12, :16], plain)  # original area unchanged in size and content
    legend = with_legend[:, 16:]
    for colour in [(0, 0, 0), (128, 0, 0), (192, 128, 128), (224, 224, 192)]:  # swatches of the 4 labels present
        assert np.all(legend == colour, axis=-1).any(), colour
    assert not np.all(legend == (0, 128, 0), axis=-1).any()  # bicycle is absent: no swatch


def test_overlay_legend_grows_with_the_classes_present():
    image = np.zeros((200, 50, 3), dtype=np.uint8)
    two = viz.overlay(image, np.tile(np.arange(2, dtype=np.uint8), (200, 25)))
    five = viz.overlay(image, np.tile(np.arange(5, dtype=np.uint8), (200, 10)))
    assert two.shape[0] == five.shape[0] == 200  # tall enough: legend fits beside the image
    tiny = viz.overlay(np.zeros((8, 8, 3), np.uint8), np.arange(64, dtype=np.uint8).reshape(8, 8) % 21)
    assert tiny.shape[0] > 8  # 21 legend rows do not fit in 8 pixels: the canvas grows downwards


def test_overlay_refuses_mismatched_sizes(label_map):
    with pytest.raises(ValueError, match="differ in size"):
        viz.overlay(np.zeros((5, 5, 3), np.uint8), label_map)


def test_prediction_grid_shape():
    images = [np.zeros((10, 20, 3), np.uint8), np.zeros((6, 8, 3), np.uint8)]
    targets = [np.zeros((10, 20), np.uint8), np.full((6, 8), 255, np.uint8)]
    preds = [np.ones((10, 20), np.uint8), np.zeros((6, 8), np.uint8)]
    grid = viz.prediction_grid(images, targets, preds)
    assert grid.shape == (16, 60, 3) and grid.dtype == np.uint8
    assert tuple(grid[0, 45]) == (128, 0, 0)  # first row, prediction column: class 1
    assert tuple(grid[12, 10]) == (224, 224, 192)  # second row, ground truth: void
    assert np.all(grid[10:, 24:] == 255)  # the narrower row is padded white


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 100, size=(21, 21))
    hist[3] = 0  # a class never seen: its row must not divide by zero
    iou = rng.random(21)
    iou[[3, 7]] = np.nan
    for fig, name in [(viz.plot_confusion_matrix(hist, VOC_CLASSES), "cm.png"),
                      (viz.plot_per_class_iou(iou, VOC_CLASSES), "sub/iou.png")]:
        path = viz.figure_to_png(fig, tmp_path / name)
        assert path.stat().st_size > 1000
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_per_class_plot_marks_absent_classes():
    iou = np.array([0.5, np.nan, 0.25])
    fig = viz.plot_per_class_iou(iou, ["a", "b", "c"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["0.50", "absent", "0.25"]
