"""cifar10: loading the hub's parquet schema, cached decoding, tensor augmentation, the CIFAR-stem ResNet-18."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from metacore.core.errors import DataError  # noqa: E402
from metacore.core.task import TaskContext  # noqa: E402
from metacore.plugins import cifar10 as c10  # noqa: E402


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_cifar_parquet(path: Path, images: np.ndarray, labels: np.ndarray, split: str = "train") -> None:
    """A parquet file in the Hugging Face CIFAR-10 schema: img = struct{bytes, path}, label = int64."""
    cells = [{"bytes": _png(img), "path": f"{split}/{i}.png"} for i, img in enumerate(images)]
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"img": pa.array(cells, type=img_type), "label": pa.array(labels, type=pa.int64())})
    pq.write_table(table, path)


@pytest.fixture
def cifar_dir(tmp_path):
    rng = np.random.RandomState(1)
    root = tmp_path / "data" / "cifar10"
    root.mkdir(parents=True)
    arrays = {}
    for name, n in (("train-0", 12), ("train-1", 12), ("test", 10)):
        images = rng.randint(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.randint(0, 10, size=n)
        write_cifar_parquet(root / f"{name}.parquet", images, labels, "test" if name == "test" else "train")
        arrays[name] = (images, labels)
    return tmp_path / "data", arrays


def _ctx(data_dir, **options):
    task = c10.Cifar10Task()
    preset = task.preset("smoke")
    opts = task.resolve_options(preset, options)
    return task, TaskContext(preset, opts, 0, "cpu", data_dir, task.hparam_space().defaults())


def test_local_parquet_decodes_exactly_and_val_follows_train_rows(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "cache"))
    data_dir, arrays = cifar_dir
    task, ctx = _ctx(data_dir, train_size=10, val_size=6, test_size=7)
    data = task.load_data(ctx)
    x_all = np.concatenate([arrays["train-0"][0], arrays["train-1"][0]]).transpose(0, 3, 1, 2)
    y_all = np.concatenate([arrays["train-0"][1], arrays["train-1"][1]])
    assert data.train[0].dtype == torch.uint8 and tuple(data.train[0].shape) == (10, 3, 32, 32)
    np.testing.assert_array_equal(data.train[0].numpy(), x_all[:10])
    np.testing.assert_array_equal(data.train[1].numpy(), y_all[:10])
    np.testing.assert_array_equal(data.val[0].numpy(), x_all[10:16])  # crosses into train-1
    np.testing.assert_array_equal(data.val[1].numpy(), y_all[10:16])
    np.testing.assert_array_equal(data.test[0].numpy(), arrays["test"][0][:7].transpose(0, 3, 1, 2))
    assert data.info["data.train"] == 10 and data.info["data.val"] == 6 and data.info["data.test"] == 7

    # a second load reads the decoded cache: decoding is not called again
    assert list((tmp_path / "cache" / "cifar10").glob("*.pt"))
    monkeypatch.setattr(c10, "decode_images", lambda blobs: pytest.fail("decoded twice"))
    again = task.load_data(ctx)
    assert torch.equal(again.train[0], data.train[0])


def test_reads_only_the_files_it_needs(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "cache"))
    data_dir, _ = cifar_dir
    (data_dir / "cifar10" / "train-1.parquet").write_bytes(b"not parquet")  # must not be touched
    task, ctx = _ctx(data_dir, train_size=8, val_size=4, test_size=3)
    assert task.load_data(ctx).train_size == 8
    task, ctx = _ctx(data_dir, train_size=10, val_size=6, test_size=3)
    with pytest.raises(DataError, match="train-1.parquet"):
        task.load_data(ctx)


def test_too_few_images_and_bad_schema_are_data_errors(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "cache"))
    data_dir, _ = cifar_dir
    task, ctx = _ctx(data_dir, train_size=20, val_size=10, test_size=3)
    with pytest.raises(DataError, match="fewer than"):
        task.load_data(ctx)
    pq.write_table(pa.table({"image": [b"x"], "label": [0]}), data_dir / "cifar10" / "test.parquet")
    task, ctx = _ctx(data_dir, train_size=4, val_size=2, test_size=1)
    with pytest.raises(DataError, match="lacks column"):
        task.load_data(ctx)


def test_hub_code_path_on_local_files_of_the_hub_format(cifar_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "cache"))
    data_dir, arrays = cifar_dir
    root = data_dir / "cifar10"
    files = {"train": [str(root / "train-0.parquet"), str(root / "train-1.parquet")],
             "test": str(root / "test.parquet")}

    def fake_hub(task, hub_id, expected, **kw):
        assert hub_id == "uoft-cs/cifar10"
        ds = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
        return ds.cast_column("img", datasets.Image())  # decoded features, as the hub's dataset has

    monkeypatch.setattr(c10.dl, "load_hub_dataset", fake_hub)
    task, ctx = _ctx(None, train_size=9, val_size=3, test_size=4)
    data = task.load_data(ctx)
    assert data.info["data.source"] == "hub uoft-cs/cifar10"
    np.testing.assert_array_equal(data.val[0].numpy(), arrays["train-0"][0][9:12].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(data.test[1].numpy(), arrays["test"][1][:4])


def test_no_local_data_offline_names_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task, ctx = _ctx(tmp_path)  # a data dir without cifar10/
    with pytest.raises(DataError, match="--data-dir"):
        task.load_data(ctx)


def test_augment_is_a_padded_crop_or_flip_and_follows_the_seed():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(3)
    a = c10.augment(images)
    torch.manual_seed(3)
    b = c10.augment(images)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == images.shape
    torch.manual_seed(4)
    assert not torch.equal(c10.augment(images), a)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(len(images)):
        candidates = [padded[i, :, oy:oy + 32, ox:ox + 32] for oy in range(9) for ox in range(9)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(a[i], c) for c in candidates), f"image {i} is not a padded crop (or its flip)"


def test_augmentation_flips_about_half_and_shifts():
    torch.manual_seed(0)
    images = torch.arange(32, dtype=torch.uint8).repeat(400, 3, 32, 1)  # column index as pixel value
    out = c10.augment(images)
    row = out[:, 0, 16].to(torch.int64)  # a middle row: values increase (no flip) or decrease (flip)
    flipped = (row[:, 20] < row[:, 10]).float().mean().item()
    assert 0.4 < flipped < 0.6


def test_resnet18_cifar_stem_matches_torchvision_parameter_count():
    torchvision = pytest.importorskip("torchvision")
    model = c10.cifar_resnet18(64)
    net = model[1]
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    reference = torchvision.models.resnet18(num_classes=10)
    n_ref = sum(p.numel() for p in reference.parameters()) - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    assert sum(p.numel() for p in model.parameters()) == n_ref
    narrow = c10.cifar_resnet18(8)
    out = narrow(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 10)
    assert narrow[1].layer4[0].conv1.out_channels == 64 and narrow[1].fc.in_features == 64


def test_declared_seed_defaults_and_presets():
    task = c10.Cifar10Task()
    assert task.hparam_space().defaults() == {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64}
    presets = task.presets()
    assert set(presets) == {"full", "small", "smoke"}
    assert presets["full"].options["width"] == 64 and presets["small"].options["width"] < 64
    assert presets["small"].options["train_size"] == 10000


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.3, 0.2, 0.1], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])
    targets = torch.tensor([0, 1, 2, 2, 0])
    metrics = c10.Cifar10Task().compute_metrics(logits, targets, None)
    pred = [0, 1, 0, 2, 1]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(targets.numpy(), pred)) == pytest.approx(0.6)
    assert metrics["f1_macro"] == pytest.approx(f1_score(targets.numpy(), pred, average="macro"))


@pytest.mark.slow
def test_cli_smoke_on_real_data(cli, data_dir):
    res = cli("run", "--task", "cifar10", "--controller", "static", "--baseline", "none", "--preset", "smoke",
              "--data-dir", str(data_dir), "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    (run,) = summary["runs"]
    assert run["steps"] == c10.Cifar10Task().preset("smoke").steps
    for metric in ("accuracy", "f1_macro"):
        assert 0.0 <= run["final"][f"test/{metric}"] <= 1.0
        assert f"val/{metric}" in run["final"]
