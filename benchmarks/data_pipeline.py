"""Training data pipeline throughput: fcnseg's VOCDataModule vs torchvision's VOCSegmentation + the segmentation
reference's transforms, on the same VOC-layout files (decode + augment + collate, same workers, same batch size).

    python benchmarks/data_pipeline.py [--quick]

Baseline: ``torchvision.datasets.VOCSegmentation`` with torchvision ``references/segmentation`` training transforms
(random resize -> RandomHorizontalFlip -> RandomCrop -> PILToTensor -> ToDtype(float, scale) -> Normalize), written
out below as in ``references/segmentation/transforms.py``, with one change so that both pipelines do the same work:
the reference's RandomResize(260, 1040) of the short side (for VOC's 500x375 photos a scale of 0.69-2.77, about
1.9x the pixels ours resizes to on average) becomes a random scale of the image by a factor uniform in [0.5, 2.0],
fcnseg's ``scale_min``/``scale_max`` (``RandomScaleResize``). Both use the same crop.
Also measured: a single-process breakdown of where each pipeline spends its time per image.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bar_plot, machine_info, parse_args, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


# -- the VOC-layout files --------------------------------------------------------------------------------------

def write_voc_like(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEGs at VOC sizes (500 wide, 333-500 high) with palette PNG labels, in
    ``root/VOCdevkit/VOC2012``. Images are smooth (low-frequency colour + objects), so JPEG decode costs what it
    costs on photographs, not on noise."""
    from fcnseg.data.voc import save_label_png

    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(count):
        height, width = int(rng.choice([333, 375, 375, 375, 500])), 500
        coarse = rng.integers(0, 256, size=(height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        image = np.array(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        label = np.zeros((height, width), dtype=np.uint8)
        for _ in range(3):
            cls = int(rng.integers(1, 21))
            y0, x0 = int(rng.integers(0, height - 60)), int(rng.integers(0, width - 60))
            y1, x1 = y0 + int(rng.integers(40, height // 2)), x0 + int(rng.integers(40, width // 2))
            label[y0:y1, x0:x1] = cls
            image[y0:y1, x0:x1] = (image[y0:y1, x0:x1] // 2 + rng.integers(0, 128, 3, dtype=np.uint8))
            label[y0:y0 + 3, x0:x1] = 255  # a void band, as VOC's object boundaries
        image_id = f"2007_{i:06d}"
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        save_label_png(label, voc / "SegmentationClass" / f"{image_id}.png")
        ids.append(image_id)
    text = "".join(f"{i}\n" for i in ids)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(text)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text(text)
    return voc


# -- torchvision references/segmentation/transforms.py (classic functional version) ----------------------------

def _pad_if_smaller(img, size, fill=0):
    import torchvision.transforms.functional as F

    min_size = min(img.size)
    if min_size < size:
        ow, oh = img.size
        padh = size - oh if oh < size else 0
        padw = size - ow if ow < size else 0
        img = F.pad(img, (0, 0, padw, padh), fill=fill)
    return img


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomScaleResize:
    """The reference's RandomResize, drawing a scale factor of the image (as fcnseg's RandomScale) instead of a
    short-side length: same interpolation (bilinear, antialiased; nearest for the target)."""

    def __init__(self, scale_min, scale_max):
        self.scale_min, self.scale_max = scale_min, scale_max

    def __call__(self, image, target):
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        size = max(1, round(min(image.size) * random.uniform(self.scale_min, self.scale_max)))
        image = F.resize(image, size, antialias=True)
        target = F.resize(target, size, interpolation=InterpolationMode.NEAREST)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, flip_prob):
        self.flip_prob = flip_prob

    def __call__(self, image, target):
        import torchvision.transforms.functional as F

        if random.random() < self.flip_prob:
            image = F.hflip(image)
            target = F.hflip(target)
        return image, target


class RandomCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image, target):
        import torchvision.transforms as T
        import torchvision.transforms.functional as F

        image = _pad_if_smaller(image, self.size)
        target = _pad_if_smaller(target, self.size, fill=255)
        crop_params = T.RandomCrop.get_params(image, (self.size, self.size))
        image = F.crop(image, *crop_params)
        target = F.crop(target, *crop_params)
        return image, target


class PILToTensor:
    def __call__(self, image, target):
        import torchvision.transforms.functional as F

        image = F.pil_to_tensor(image)
        target = torch.as_tensor(np.array(target), dtype=torch.int64)
        return image, target


class ToDtype:
    def __init__(self, dtype, scale=False):
        self.dtype = dtype
        self.scale = scale

    def __call__(self, image, target):
        image = image.to(dtype=self.dtype)
        if self.scale:
            image = image / 255.0
        return image, target


class Normalize:
    def __init__(self, mean, std):
        self.mean = mean
        self.std = std

    def __call__(self, image, target):
        import torchvision.transforms.functional as F

        return F.normalize(image, mean=self.mean, std=self.std), target


SCALE_RANGE = (0.5, 2.0)  # fcnseg's conf/data/voc.yaml train_transform scale_min, scale_max


def reference_train_transform(crop_size: int) -> Compose:
    """``SegmentationPresetTrain`` of torchvision's reference (``--backend pil``, no v2), resizing by fcnseg's
    scale range (its own RandomResize(0.5 * 520, 2.0 * 520) of the short side resizes ~1.9x more pixels)."""
    return Compose([
        RandomScaleResize(*SCALE_RANGE),
        RandomHorizontalFlip(0.5),
        RandomCrop(crop_size),
        PILToTensor(),
        ToDtype(torch.float, scale=True),
        Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])


# -- loaders ---------------------------------------------------------------------------------------------------

def fcnseg_loader(voc: Path, crop: int, batch: int, workers: int, color_jitter: float):
    from fcnseg.data import VOCDataModule

    datamodule = VOCDataModule(str(voc), batch_size=batch, num_workers=workers, pin_memory=False,
                               train_transform={"crop_size": crop, "scale_min": SCALE_RANGE[0],
                                                "scale_max": SCALE_RANGE[1], "hflip": True,
                                                "color_jitter": color_jitter})
    datamodule.setup("fit")
    return datamodule.train_dataloader()


def torchvision_loader(root: Path, crop: int, batch: int, workers: int):
    from torchvision.datasets import VOCSegmentation

    dataset = VOCSegmentation(root=str(root), year="2012", image_set="train",
                              transforms=reference_train_transform(crop))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0)


def timed_epoch(loader, epoch: int) -> float:
    """images/s of one pass over ``loader``."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    count, start = 0, time.perf_counter()
    for images, masks in loader:
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def interleaved_rates(loaders: dict, epochs: int) -> dict[str, list[float]]:
    """One untimed epoch each (worker start-up, page cache), then timed epochs taken in turn (A B C A B C ...),
    so that load from other jobs on a shared machine hits every pipeline alike."""
    for loader in loaders.values():
        timed_epoch(loader, 0)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for epoch in range(1, epochs + 1):
        for name, loader in loaders.items():
            rates[name].append(timed_epoch(loader, epoch))
    return rates


# -- where the time goes (one process) -------------------------------------------------------------------------

def breakdown(voc: Path, crop: int, count: int) -> dict[str, float]:
    """Mean ms per image of each stage, single process (no workers)."""
    import cv2

    from fcnseg.data.transforms import build_train_transform
    from fcnseg.data.voc import VOCSegmentation as FcnsegVOC
    from fcnseg.data.voc import read_dataset_image, read_label

    cv2.setNumThreads(1)  # as in DataLoader workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dataset = FcnsegVOC(voc, "train")
    samples = dataset.samples[:count]
    stages: dict[str, list[float]] = {}

    def timed(name, fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        stages.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out

    transform = build_train_transform(crop, color_jitter=0.2, seed=0)
    for sample in samples:
        image = timed("fcnseg: read_image (PIL decode + RGB copy)", read_dataset_image, sample.image)
        mask = timed("fcnseg: read_label (PNG)", read_label, sample.label)
        timed("fcnseg: _check_label (bincount)", dataset._check_label, sample, image, mask)
        data = {"image": image, "mask": mask}
        for step in transform.transforms:
            data = timed(f"fcnseg: {type(step).__name__}", step, **data)
        timed("alt: cv2.imread + cvtColor", lambda p: cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB),
              sample.image)
        timed("alt: torchvision.io.decode_jpeg", _decode_tv, sample.image)

    for sample in samples:
        image, mask = read_dataset_image(sample.image), read_label(sample.label)
        timed("fcnseg: whole train transform", transform, image=image, mask=mask)

    reference = reference_train_transform(crop)
    for sample in samples:
        img = timed("torchvision: PIL open+decode (RGB)", lambda p: Image.open(p).convert("RGB"), sample.image)
        tgt = timed("torchvision: PIL open label", lambda p: _loaded(Image.open(p)), sample.label)
        for step in reference.transforms:
            img, tgt = timed(f"torchvision: {type(step).__name__}", step, img, tgt)
    torch.set_num_threads(threads)
    # medians: the first calls pay lazy imports and allocator warm-up
    return {name: round(statistics.median(values), 3) for name, values in stages.items()}


def _loaded(image):
    image.load()
    return image


def _decode_tv(path):
    from torchvision.io import decode_jpeg, read_file

    return decode_jpeg(read_file(str(path)))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--images", type=int, default=None),
        p.add_argument("--workers", type=int, default=2),
        p.add_argument("--crop", type=int, default=320),
        p.add_argument("--batch", type=int, default=8),
    ))
    started = time.perf_counter()
    machine = machine_info()
    count = args.images or (48 if args.quick else 200)
    epochs = 1 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="fcnseg-bench-voc-") as tmp:
        root = Path(tmp)
        voc = write_voc_like(root, count)
        pipelines = {
            "torchvision reference": lambda w: torchvision_loader(root, args.crop, args.batch, w),
            "fcnseg, same augmentations": lambda w: fcnseg_loader(voc, args.crop, args.batch, w, 0.0),
            "fcnseg, voc.yaml defaults (+ColorJitter 0.2)": lambda w: fcnseg_loader(voc, args.crop, args.batch, w, 0.2),
        }
        results: dict[str, dict] = {}
        # workers=N is the real setting; workers=0 (in-process, torch at 1 thread) is the pipeline's own cost,
        # less sensitive to other jobs competing for the cores.
        threads = torch.get_num_threads()
        for workers in (args.workers, 0):
            torch.set_num_threads(threads if workers else 1)
            group = results.setdefault(f"workers={workers}", {})
            rates = interleaved_rates({name: make(workers) for name, make in pipelines.items()}, epochs)
            for name, values in rates.items():
                group[name] = {"images_per_s": statistics.median(values), "epochs": values}
                print(f"  workers={workers} {name}: {group[name]['images_per_s']:.1f} images/s", flush=True)
        torch.set_num_threads(threads)
        stages = breakdown(voc, args.crop, min(count, 16 if args.quick else 40))
    for group in results.values():
        base = group["torchvision reference"]
        for value in group.values():
            value["ratio_vs_torchvision"] = value["images_per_s"] / base["images_per_s"]
            # epoch k of each pipeline ran right after epoch k of the baseline: a ratio per pair, so that load from
            # other jobs (which moves both) cancels; the claim stands only if every pair says the same
            paired = [ours / theirs for ours, theirs in zip(value["epochs"], base["epochs"])]
            value["paired_epoch_ratios"] = paired
            value["paired_ratio_min_median_max"] = [min(paired), statistics.median(paired), max(paired)]
            value["faster_in_every_pair"] = min(paired) > 1.0
    payload = {
        "config": {"images": count, "image_size": "500x(333..500)", "crop": args.crop, "batch": args.batch,
                   "scale_range_both": list(SCALE_RANGE),
                   "num_workers": args.workers, "timed_epochs": epochs, "quick": args.quick},
        "results": results,
        "breakdown_ms_per_image_single_process": stages,
        "goal": "fcnseg >= 1.5x the torchvision reference",
    }
    path = write_results("data_pipeline", payload, machine, started)
    labels = [f"{group}\n{name.replace(' (', chr(10) + '(')}" for group in results for name in results[group]]
    bar_plot("data_pipeline", labels, [v["images_per_s"] for group in results.values() for v in group.values()],
             "training images/s (higher is better)",
             f"decode+augment+collate, crop {args.crop}, batch {args.batch}")
    parts = []
    for group_name, group in results.items():
        low, mid, high = group["fcnseg, same augmentations"]["paired_ratio_min_median_max"]
        parts.append(f"{group_name}: fcnseg {group['fcnseg, same augmentations']['ratio_vs_torchvision']:.2f}x "
                     f"torchvision ({group['torchvision reference']['images_per_s']:.1f} img/s; paired epochs "
                     f"{low:.2f}-{high:.2f}x, median {mid:.2f}x), "
                     f"{group['fcnseg, voc.yaml defaults (+ColorJitter 0.2)']['ratio_vs_torchvision']:.2f}x with "
                     "ColorJitter")
    print(f"data_pipeline: {'; '.join(parts)}; {path}")


if __name__ == "__main__":
    main()
