"""SegmentationMetrics: the paper's four metrics from one confusion matrix, checked against hand-worked numbers."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from fcnseg.metrics import SegmentationMetrics, metrics_from_confusion

V = 255  # void

# Two 2×4 images, 3 classes. Row-major pixels, with the void pixel (target 255, predicted 2) not counted:
#   (true, pred): (0,0) (0,1) (1,1) (1,1) | (2,2) (2,0) void (0,0)
TARGET = torch.tensor([[[0, 0, 1, 1], [2, 2, V, 0]]])
PRED = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
# hist[true, pred]:
#          pred 0  1  2     row sums
#   true 0    [2, 1, 0]     3
#   true 1    [0, 2, 0]     2
#   true 2    [1, 0, 1]     2
#   column sums 3, 3, 1;  total 7;  diagonal 2, 2, 1 (sum 5)
HIST = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 0, 1]])
# pixel acc = 5/7
# per-class acc = 2/3, 2/2, 1/2            → mean acc = (2/3 + 1 + 1/2) / 3 = 13/18
# IoU = 2/(3+3-2), 2/(2+3-2), 1/(2+1-1) = 1/2, 2/3, 1/2 → mean IoU = (5/3) / 3 = 5/9
# freq = 3/7, 2/7, 2/7 → fw IoU = 3/7·1/2 + 2/7·2/3 + 2/7·1/2 = 9/42 + 8/42 + 6/42 = 23/42
EXPECTED = {"pixel_acc": 5 / 7, "mean_acc": 13 / 18, "mean_iou": 5 / 9, "fw_iou": 23 / 42}


def one_hot_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scores whose argmax is ``labels``: (N, H, W) → (N, C, H, W) float."""
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def test_hand_computed_example():
    metric = SegmentationMetrics(num_classes=3)
    metric.update(PRED, TARGET)
    results = metric.compute()
    assert torch.equal(results["confusion_matrix"], HIST)
    for key, value in EXPECTED.items():
        assert float(results[key]) == pytest.approx(value, abs=1e-12), key
        assert results[key].ndim == 0 and results[key].is_floating_point()
    assert results["per_class_iou"].tolist() == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert results["per_class_acc"].tolist() == pytest.approx([2 / 3, 1.0, 1 / 2])


def test_metrics_from_confusion_is_what_compute_uses():
    results = metrics_from_confusion(HIST)
    for key, value in EXPECTED.items():
        assert float(results[key]) == pytest.approx(value, abs=1e-12)


def test_absent_class_is_nan_and_left_out_of_the_means():
    # Same data, but 5 classes: 3 never occurs anywhere (nan); 4 is predicted but never true (IoU 0, acc nan).
    pred = PRED.clone()
    pred[0, 1, 2] = 4  # the void pixel: still not counted
    pred[0, 0, 0] = 4  # a true-0 pixel predicted as 4 → hist[0] = [1, 1, 0, 0, 1]
    metric = SegmentationMetrics(num_classes=5)
    metric.update(pred, TARGET)
    results = metric.compute()
    iou = results["per_class_iou"]
    # IoU_0 = 1 / (3 + 2 - 1) = 1/4; IoU_1 = 2/3; IoU_2 = 1/2; IoU_3 = nan; IoU_4 = 0 / (0 + 1 - 0) = 0
    assert iou[:3].tolist() == pytest.approx([1 / 4, 2 / 3, 1 / 2])
    assert math.isnan(iou[3]) and iou[4] == 0.0
    assert float(results["mean_iou"]) == pytest.approx((1 / 4 + 2 / 3 + 1 / 2 + 0) / 4)
    acc = results["per_class_acc"]
    assert math.isnan(acc[3]) and math.isnan(acc[4])
    assert float(results["mean_acc"]) == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    # fw IoU skips the nan term: 3/7·1/4 + 2/7·2/3 + 2/7·1/2
    assert float(results["fw_iou"]) == pytest.approx(3 / 28 + 4 / 21 + 1 / 7)


def test_void_and_out_of_range_targets_are_not_counted():
    metric = SegmentationMetrics(num_classes=3)
    target = torch.tensor([[[V, V, 7, 1]]])
    metric.update(torch.tensor([[[0, 1, 2, 1]]]), target)
    assert metric.compute()["confusion_matrix"].sum() == 1
    assert float(metric.compute()["pixel_acc"]) == 1.0


def test_custom_ignore_index():
    metric = SegmentationMetrics(num_classes=3, ignore_index=0)
    metric.update(PRED, TARGET)
    assert metric.compute()["confusion_matrix"][0].sum() == 0  # class 0 is now the ignored label


def test_logits_and_labels_give_the_same_matrix():
    from_labels = SegmentationMetrics(num_classes=3)
    from_logits = SegmentationMetrics(num_classes=3)
    from_labels.update(PRED, TARGET)
    from_logits.update(one_hot_logits(PRED, 3), TARGET)
    assert torch.equal(from_logits.compute()["confusion_matrix"], from_labels.compute()["confusion_matrix"])


def test_wrong_shapes_are_refused():
    metric = SegmentationMetrics(num_classes=3)
    with pytest.raises(ValueError, match="scores"):
        metric.update(torch.zeros(1, 4, 2, 4), TARGET)
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(PRED[:, :1], TARGET)


def test_reset_clears_the_matrix():
    metric = SegmentationMetrics(num_classes=3)
    metric.update(PRED, TARGET)
    metric.reset()
    assert metric.confusion_matrix.sum() == 0
    metric.update(PRED, TARGET)
    assert torch.equal(metric.compute()["confusion_matrix"], HIST)  # not doubled


def random_batches(num_batches: int, num_classes: int, seed: int = 0, labels_used: int | None = None):
    """Logits and targets (10% void); only labels below ``labels_used`` occur, so the rest are absent classes."""
    generator = torch.Generator().manual_seed(seed)
    labels_used = labels_used or num_classes
    for _ in range(num_batches):
        target = torch.randint(0, labels_used, (2, 9, 11), generator=generator)
        target[torch.rand(target.shape, generator=generator) < 0.1] = V
        # predictions right about half the time, so the matrix has a real diagonal and off-diagonal
        noise = torch.randint(0, labels_used, target.shape, generator=generator)
        keep = torch.rand(target.shape, generator=generator) < 0.5
        pred = torch.where(keep & (target != V), target, noise)
        jitter = 0.5 * torch.rand(pred.shape[0], num_classes, *pred.shape[1:], generator=generator)
        yield one_hot_logits(pred, num_classes) + jitter, target  # argmax is still ``pred``


@pytest.mark.parametrize(("num_classes", "labels_used"), [(4, 4), (21, 21), (6, 4)])
def test_mean_iou_agrees_with_torchmetrics(num_classes, labels_used):
    ours = SegmentationMetrics(num_classes)
    reference = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=V)
    for logits, target in random_batches(3, num_classes, labels_used=labels_used):
        ours.update(logits, target)
        reference.update(logits, target)
    assert float(ours.compute()["mean_iou"]) == pytest.approx(float(reference.compute()), abs=1e-6)


def test_several_updates_equal_one_update_on_the_concatenation():
    batches = list(random_batches(4, 5, seed=1))
    accumulated, at_once = SegmentationMetrics(5), SegmentationMetrics(5)
    for logits, target in batches:
        accumulated.update(logits, target)
    at_once.update(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    many, one = accumulated.compute(), at_once.compute()
    assert torch.equal(many["confusion_matrix"], one["confusion_matrix"])
    for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"):
        assert float(many[key]) == float(one[key])


def test_empty_metric_is_nan_not_zero():
    results = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert all(math.isnan(float(results[key])) for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"))
