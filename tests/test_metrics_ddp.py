"""Metrics under real 2-process DDP (gloo, CPU): exact across ranks, no sample counted twice."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from fcnseg.data.samplers import UnpaddedDistributedSampler
from fcnseg.metrics import SegmentationMetrics
from tests.servers import free_port

NUM_CLASSES = 4
NUM_SAMPLES = 7  # odd: a padding sampler must repeat one sample to give 2 ranks 4 each
WORLD_SIZE = 2


def make_dataset() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seven (prediction, target) label maps, all different, so any repeated sample changes the matrix."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(NUM_SAMPLES):
        target = torch.randint(0, NUM_CLASSES, (6, 5), generator=generator)
        target[0, 0] = 255  # a void pixel in every sample
        pred = torch.randint(0, NUM_CLASSES, (6, 5), generator=generator)
        samples.append((pred, target))
    return samples


def metrics_over(dataset, indices) -> dict[str, torch.Tensor]:
    metric = SegmentationMetrics(NUM_CLASSES)
    for index in indices:
        pred, target = dataset[index]
        metric.update(pred[None], target[None])
    return metric.compute()  # under DDP: sums the matrix over ranks


def ddp_worker(rank: int, port: int, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        dataset = make_dataset()
        unpadded = UnpaddedDistributedSampler(dataset)  # rank and world size from the process group
        padded = DistributedSampler(dataset, shuffle=False)
        results = {
            "unpadded": metrics_over(dataset, unpadded),
            "padded": metrics_over(dataset, padded),
            "local_count": len(unpadded),
        }
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict:
    out_file = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    mp.spawn(ddp_worker, args=(free_port(), str(out_file)), nprocs=WORLD_SIZE, join=True)
    return torch.load(out_file)


def test_ddp_metrics_equal_single_process(ddp_results):
    single = metrics_over(make_dataset(), range(NUM_SAMPLES))
    synced = ddp_results["unpadded"]
    assert ddp_results["local_count"] == 4  # rank 0 saw only its 4 samples, yet reports all 7
    assert torch.equal(synced["confusion_matrix"], single["confusion_matrix"])
    for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"):
        assert float(synced[key]) == float(single[key]), key
    assert torch.equal(synced["per_class_iou"], single["per_class_iou"])


def test_padding_sampler_would_count_a_sample_twice(ddp_results):
    # The check above can fail: torch's padding sampler repeats sample 0 on rank 1, so its matrix is off by it.
    single = metrics_over(make_dataset(), range(NUM_SAMPLES))["confusion_matrix"]
    padded = ddp_results["padded"]["confusion_matrix"]
    repeated = metrics_over(make_dataset(), [0])["confusion_matrix"]
    assert not torch.equal(padded, single)
    assert torch.equal(padded, single + repeated)


@pytest.mark.parametrize(("length", "replicas"), [(7, 2), (10, 3), (2, 4), (0, 2)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_splits_the_dataset_exactly(length, replicas, shuffle):
    dataset = list(range(length))
    shares = [list(UnpaddedDistributedSampler(dataset, replicas, rank, shuffle=shuffle)) for rank in range(replicas)]
    assert sorted(i for share in shares for i in share) == dataset  # every sample once, none twice
    for rank, share in enumerate(shares):
        assert len(UnpaddedDistributedSampler(dataset, replicas, rank)) == len(share)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_sampler_shuffles_by_seed_and_epoch():
    dataset = list(range(50))
    sampler = UnpaddedDistributedSampler(dataset, 2, 0, shuffle=True, seed=3)
    first = list(sampler)
    assert first == list(UnpaddedDistributedSampler(dataset, 2, 0, shuffle=True, seed=3))  # same on every rank
    assert first != list(range(0, 50, 2))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert first != list(UnpaddedDistributedSampler(dataset, 2, 0, shuffle=True, seed=4))


def test_sampler_is_a_distributed_sampler():
    # Lightning keeps a DataLoader's sampler only if it is a DistributedSampler; otherwise it swaps in a padding one.
    assert isinstance(UnpaddedDistributedSampler(list(range(3)), 2, 0), DistributedSampler)
