"""``cifar10``: ResNet-18 (torchvision, CIFAR stem) on CIFAR-10, SGD with momentum — the seed's task.

Images are decoded once into one uint8 tensor (cached on disk, so a second run skips JPEG/PNG decoding) and kept on the
run's device; augmentation (random crop with 4-pixel zero padding, horizontal flip) runs on whole batches of tensors in
:meth:`Cifar10Task.train_batch`, drawn from torch's global RNG, which the trainer seeds, so runs are reproducible from
the seed and a controller run and its baseline see the same augmented batches. Normalisation is the model's first
layer, so evaluation feeds the stored uint8 images unchanged.

Data: ``<data-dir>/cifar10/train-*.parquet`` and ``test.parquet`` (the Hugging Face parquet schema: ``img`` =
struct{bytes, path}, ``label``), else ``datasets.load_dataset("uoft-cs/cifar10")``. The validation split is held out
from the training files (the rows after the training rows), never taken from the test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metacore.core.errors import DataError
from metacore.core.hookspecs import hookimpl
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.options import OptionSpec
from metacore.core.task import Preset, Task, TaskContext, TaskData
from metacore.plugins import data as dl

HUB_ID = "uoft-cs/cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)  # the canonical CIFAR-10 training-set statistics
STD = (0.2470, 0.2435, 0.2616)
EXPECTED = "cifar10/train-*.parquet and cifar10/test.parquet"


class Cifar10Task(Task):
    """CIFAR-10, ResNet-18 with the CIFAR stem, SGD with momentum."""

    name = "cifar10"
    bf16_autocast = True
    description = "CIFAR-10, ResNet-18 (CIFAR stem), SGD lr 1e-3 momentum 0.9 (the seed's task)"
    primary_metric = "accuracy"
    metrics = {"accuracy": "max", "f1_macro": "max"}
    eval_batch_size = 500

    def hparam_space(self) -> HParamSpace:
        return HParamSpace([
            HParamSpec("lr", 1e-3, 1e-6, 10.0, log=True, help="SGD learning rate"),
            HParamSpec("momentum", 0.9, 0.0, 0.999, help="SGD momentum"),
            HParamSpec("weight_decay", 1e-4, 0.0, 0.1, help="L2 weight decay (SGD's coupled form)"),
            HParamSpec("batch_size", 64, 8, 1024, acts_on="data", integer=True, help="images per step"),
        ], owner="task cifar10")

    def option_specs(self) -> dict[str, OptionSpec]:
        return {
            "width": OptionSpec("width", 64, int, "channels of the first stage (64 = ResNet-18; stages w,2w,4w,8w)",
                                1, 512),
            "train_size": OptionSpec("train_size", 45000, int, "training images (rows of train-*.parquet, in order)",
                                     1, 50000),
            "val_size": OptionSpec("val_size", 5000, int, "validation images held out after the training rows",
                                   1, 49999),
            "test_size": OptionSpec("test_size", 10000, int, "test images (first rows of test.parquet)", 1, 10000),
            "augment": OptionSpec("augment", True, bool, "random crop (pad 4) and horizontal flip while training"),
        }

    def presets(self) -> dict[str, Preset]:
        return {
            "full": Preset("full", steps=21100, eval_interval=703, log_interval=50, checkpoint_interval=2000,
                           options={"width": 64, "train_size": 45000, "val_size": 5000, "test_size": 10000},
                           description="ResNet-18 (width 64), 45k train / 5k val / 10k test, 30 epochs at batch 64"),
            "small": Preset("small", steps=600, eval_interval=100, log_interval=20, checkpoint_interval=200,
                            options={"width": 16, "train_size": 10000, "val_size": 1000, "test_size": 10000},
                            description="ResNet-18 narrowed to width 16, one balanced 10k training file, "
                                        "1k val, full 10k test, ~4 epochs"),
            "smoke": Preset("smoke", steps=10, eval_interval=5, log_interval=5,
                            options={"width": 4, "train_size": 256, "val_size": 128, "test_size": 128},
                            description="width 4, 256 train / 128 val / 128 test images; seconds, for tests"),
        }

    # ------------------------------------------------------------------------------------------------ data
    def load_data(self, ctx: TaskContext) -> TaskData:
        opts = ctx.options
        n_train, n_val, n_test = opts["train_size"], opts["val_size"], opts["test_size"]
        if n_train + n_val > 50000:
            raise DataError(f"cifar10: train_size + val_size = {n_train + n_val} exceeds the 50,000 training images")
        root = dl.local_dir(ctx.data_dir, "cifar10")
        if root is not None:
            train_x, train_y, test_x, test_y, source = _load_local(root, n_train + n_val, n_test)
        else:
            train_x, train_y, test_x, test_y, source = _load_hub(n_train + n_val, n_test, ctx.data_dir)
        if train_x.shape[0] < n_train + n_val:
            raise DataError(f"cifar10: {source} holds {train_x.shape[0]} training images, "
                            f"fewer than train_size + val_size = {n_train + n_val}")
        device = ctx.device
        train = (train_x[:n_train].to(device), train_y[:n_train].to(device))
        val = (train_x[n_train:n_train + n_val].to(device), train_y[n_train:n_train + n_val].to(device))
        test = (test_x[:n_test].to(device), test_y[:n_test].to(device))
        info = {"preset.description": ctx.preset.description,
                "data.source": source, "data.train": n_train, "data.val": n_val, "data.test": int(test[0].shape[0]),
                "data.val_from": "training rows after train_size", "data.augment": bool(opts["augment"]),
                "model.arch": "torchvision resnet18, CIFAR stem (3x3 s1 conv, no max-pool)",
                "model.width": opts["width"]}
        return TaskData(train=train, val=val, test=test, info=info)

    def train_batch(self, data: TaskData, indices, ctx: TaskContext) -> tuple:
        x, y = data.train
        idx = indices.to(x.device)
        images, labels = x[idx], y[idx]
        if ctx.options.get("augment", True):
            images = augment(images)
        return images, labels

    # ------------------------------------------------------------------------------------------------ model
    def build_model(self, data: TaskData, ctx: TaskContext):
        return cifar_resnet18(ctx.options["width"], num_classes=10, channels_last=ctx.on_cuda)

    def build_optimizer(self, model, hparams, ctx: TaskContext):
        import torch

        # fused on CUDA: one kernel for the whole step, and it takes the learning rate as a device tensor (no sync)
        return torch.optim.SGD(model.parameters(), lr=hparams["lr"], momentum=hparams["momentum"],
                               weight_decay=hparams["weight_decay"], fused=ctx.on_cuda or None)


# ---------------------------------------------------------------------------------------------------- loading
def _load_local(root: Path, n_train: int, n_test: int):
    train_files = sorted(root.glob("train-*.parquet"), key=_file_order)
    test_file = root / "test.parquet"
    if not train_files or not test_file.is_file():
        raise DataError(f"cifar10: {root} must hold train-*.parquet and test.parquet (the Hugging Face layout)")
    train_x, train_y = _decode_parquets(train_files, n_train)
    test_x, test_y = _decode_parquets([test_file], n_test)
    return train_x, train_y, test_x, test_y, f"local parquet {root}"


def _file_order(path: Path) -> tuple:
    stem = path.stem.split("-", 1)[-1]
    digits = "".join(c for c in stem if c.isdigit())
    return (int(digits) if digits else 0, path.name)


def _decode_parquets(files: list[Path], rows: int):
    """The first ``rows`` images of ``files`` (in order) as uint8 (N,3,32,32) and int64 labels; cached on disk."""
    needed, have = [], 0
    for f in files:  # read only as many files as the rows need
        if have >= rows:
            break
        needed.append(f)
        have += _parquet_rows(f)
    key = dl.cache_key(files=dl.file_identity(needed), rows=rows, v=1)

    def build() -> dict[str, Any]:
        blobs, labels = [], []
        for f in needed:
            table = dl.read_parquet(f, ["img", "label"], rows=rows - len(blobs))
            blobs.extend(_image_bytes(table.column("img").to_pylist(), f))
            labels.extend(table.column("label").to_pylist())
        return {"x": decode_images(blobs), "y": _labels(labels)}

    out = dl.cached("cifar10", key, build)
    return out["x"], out["y"]


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _image_bytes(cells: list, where: Any) -> list[bytes]:
    out = []
    for cell in cells:
        blob = cell.get("bytes") if isinstance(cell, dict) else cell
        if not blob:
            raise DataError(f"cifar10: {where} has an image without bytes (expected img = struct{{bytes, path}})")
        out.append(blob)
    return out


def _labels(labels: list):
    import torch

    y = torch.tensor(labels, dtype=torch.long)
    if y.numel() and (y.min() < 0 or y.max() > 9):
        raise DataError(f"cifar10: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}")
    return y


def decode_images(blobs: list[bytes]):
    """Encoded images (PNG/JPEG bytes) -> uint8 tensor (N, 3, 32, 32)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    out = np.empty((len(blobs), 32, 32, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as img:
                arr = np.asarray(img.convert("RGB"))
        except Exception as exc:
            raise DataError(f"cifar10: image {i} cannot be decoded: {exc}") from None
        if arr.shape != (32, 32, 3):
            raise DataError(f"cifar10: image {i} has shape {arr.shape}, expected 32x32 RGB")
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_hub(n_train: int, n_test: int, data_dir: Path | None):
    ds = dl.load_hub_dataset("cifar10", HUB_ID, EXPECTED)
    import datasets

    key = dl.cache_key(hub=HUB_ID, rows=[n_train, n_test], fingerprint=[ds["train"]._fingerprint,
                                                                        ds["test"]._fingerprint], v=1)

    def part(split, rows):
        d = ds[split].select(range(min(rows, len(ds[split])))).cast_column("img", datasets.Image(decode=False))
        return _image_bytes(d["img"], f"{HUB_ID}[{split}]"), d["label"]

    def build() -> dict[str, Any]:
        tb, tl = part("train", n_train)
        sb, sl = part("test", n_test)
        return {"x": decode_images(tb), "y": _labels(tl), "tx": decode_images(sb), "ty": _labels(sl)}

    out = dl.cached("cifar10", key, build)
    return out["x"], out["y"], out["tx"], out["ty"], f"hub {HUB_ID}"


# ---------------------------------------------------------------------------------------------------- augmentation
def augment(images, pad: int = 4):
    """Random crop with ``pad`` zero pixels each side and random horizontal flip, on a uint8 batch, on its device.

    Offsets and flips come from torch's global (CPU) RNG, which the trainer seeds and checkpoints, so the same seed
    gives the same batches on any device.
    """
    import torch
    import torch.nn.functional as F

    n, c, h, w = images.shape
    ox = torch.randint(0, 2 * pad + 1, (n,)).to(images.device)
    oy = torch.randint(0, 2 * pad + 1, (n,)).to(images.device)
    flip = (torch.rand(n) < 0.5).to(images.device)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h, device=images.device))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = torch.arange(w, device=images.device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


# ---------------------------------------------------------------------------------------------------- model
def cifar_resnet18(width: int = 64, num_classes: int = 10, channels_last: bool = False):
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), stages of width w,2w,4w,8w.

    ``width=64`` is exactly ResNet-18; smaller widths keep the architecture (BasicBlocks, [2,2,2,2]) and narrow it.
    The input is uint8 or float in [0,255]-scale uint8 images; scaling and per-channel normalisation are the first
    layer, so stored images are fed unchanged. ``channels_last``: weights and activations in NHWC (faster
    convolutions on tensor-core GPUs); the normalisation layer converts the input.
    """
    import torch
    import torch.nn as nn
    from torchvision.models.resnet import BasicBlock, ResNet

    class _NarrowResNet(ResNet):
        def __init__(self, w: int) -> None:
            self._w = w
            super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # the first stage: its input is the stem's output, w channels
                self.inplanes = self._w
            return super()._make_layer(block, planes * self._w // 64, blocks, stride, dilate)

    net = _NarrowResNet(width)
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.bn1 = nn.BatchNorm2d(width)
    net.maxpool = nn.Identity()
    net.fc = nn.Linear(8 * width * BasicBlock.expansion, num_classes)

    class Normalize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255.0)

        def forward(self, x):
            x = (x.float() - self.mean) / self.std
            return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    model = nn.Sequential(Normalize(), net)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@hookimpl
def metacore_register_tasks(register):
    register(Cifar10Task)
