"""electricity: both file formats (UCI ';'/',' and the CSV subset), resampling, leak-free split/normalisation/windows,
metrics against scikit-learn, and a CLI smoke run on the real data."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
torch = pytest.importorskip("torch")

from metacore.core.errors import DataError  # noqa: E402
from metacore.core.task import TaskContext  # noqa: E402
from metacore.plugins import electricity as el  # noqa: E402


def readings(steps: int = 4 * 24 * 12, clients: int = 3, seed: int = 0) -> pd.DataFrame:
    """15-minute kW readings starting at 2012-01-01 00:15 (UCI labels a reading at its interval's end)."""
    rng = np.random.RandomState(seed)
    index = pd.date_range("2012-01-01 00:15:00", periods=steps, freq="15min")
    t = np.arange(steps)[:, None]
    noise = rng.rand(steps, clients) * (1 + np.arange(clients))
    values = 10 + 5 * np.sin(2 * np.pi * t / 96 + np.arange(clients)) + noise
    return pd.DataFrame(np.round(values, 6), index=index, columns=[f"MT_{i + 1:03d}" for i in range(clients)])


def write_uci(path, frame: pd.DataFrame) -> None:
    """The original LD2011_2014.txt layout: quoted header with an empty first name, ';' separator, ',' decimals."""
    lines = ['"";' + ";".join(f'"{c}"' for c in frame.columns)]
    for ts, row in frame.iterrows():
        lines.append(f'"{ts:%Y-%m-%d %H:%M:%S}";' + ";".join(repr(float(v)).replace(".", ",") for v in row))
    path.write_text("\n".join(lines) + "\n")


def write_subset(path, frame: pd.DataFrame) -> None:
    """The shared/data subset layout: gzip CSV with a leading ``timestamp`` column."""
    with gzip.open(path, "wt") as f:
        frame.rename_axis("timestamp").to_csv(f)


def test_reads_uci_semicolon_comma_format(tmp_path):
    frame = readings(steps=50)
    path = tmp_path / "LD2011_2014.txt"
    write_uci(path, frame)
    assert ";" in path.read_text().splitlines()[1] and "," in path.read_text().splitlines()[1]
    got = el.read_readings(path)
    assert list(got.columns) == list(frame.columns)
    assert (got.index == frame.index).all()
    np.testing.assert_allclose(got.to_numpy(), frame.to_numpy(), rtol=0, atol=1e-9)


def test_reads_csv_subset_with_timestamp_column(tmp_path):
    frame = readings(steps=50)
    path = tmp_path / "ld2011_2014_subset_3clients_15min.csv.gz"
    write_subset(path, frame)
    got = el.read_readings(path)
    np.testing.assert_allclose(got.to_numpy(), frame.to_numpy(), atol=1e-9)
    assert got.index[0] == pd.Timestamp("2012-01-01 00:15:00")


def test_bad_file_is_a_data_error(tmp_path):
    path = tmp_path / "LD2011_2014.txt"
    path.write_text('"";"MT_001"\n"2012-01-01 00:15:00";abc\n')
    with pytest.raises(DataError, match="non-numeric"):
        el.read_readings(path)


def test_hourly_resampling_is_the_mean_of_four_readings_labelled_at_the_hour_end():
    frame = readings(steps=4 * 5 + 2)  # 5 full hours and a partial one
    hourly = el.resample(frame, "1h")
    assert len(hourly) == 5
    assert hourly.index[0] == pd.Timestamp("2012-01-01 01:00:00")
    np.testing.assert_allclose(hourly.iloc[0].to_numpy(), frame.iloc[0:4].mean().to_numpy())
    np.testing.assert_allclose(hourly.iloc[4].to_numpy(), frame.iloc[16:20].mean().to_numpy())
    assert el.resample(frame, "15min") is frame
    with pytest.raises(DataError, match="pandas offset"):
        el.resample(frame, "hourly-ish")


def test_prefers_the_uci_file_over_the_subset(tmp_path):
    write_subset(tmp_path / "ld2011_2014_subset_3clients_15min.csv.gz", readings(steps=10))
    assert el.find_source(tmp_path).name.endswith(".csv.gz")
    write_uci(tmp_path / "LD2011_2014.txt", readings(steps=10))
    assert el.find_source(tmp_path).name == "LD2011_2014.txt"


def _hourly(steps=400, clients=3, seed=0):
    index = pd.date_range("2012-01-01 01:00", periods=steps, freq="1h")
    rng = np.random.RandomState(seed)
    return pd.DataFrame(rng.rand(steps, clients) * 10 + np.arange(clients), index=index,
                        columns=[f"MT_{i:03d}" for i in range(clients)])


def test_normalisation_uses_only_the_training_span():
    frame = _hourly()
    a, b = el.split_bounds(len(frame))
    ref = el.prepare(frame, clients=0, window=24, horizon=6, max_windows=10**6)
    np.testing.assert_allclose(ref["mean"], frame.iloc[:a].mean().to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(ref["std"], frame.iloc[:a].std(ddof=0).to_numpy(), rtol=1e-5)
    changed = frame.copy()
    changed.iloc[a:] = changed.iloc[a:] * 100 + 1000  # wild validation/test values
    got = el.prepare(changed, clients=0, window=24, horizon=6, max_windows=10**6)
    np.testing.assert_array_equal(got["mean"], ref["mean"])
    np.testing.assert_array_equal(got["std"], ref["std"])
    for i in range(2):  # training windows (inputs and targets) are untouched by later data
        np.testing.assert_array_equal(got["train"][i], ref["train"][i])


def test_windows_targets_stay_inside_their_split_and_match_the_series():
    frame = _hourly(steps=300, clients=2)
    window, horizon = 24, 6
    a, b = el.split_bounds(len(frame))
    out = el.prepare(frame, clients=0, window=window, horizon=horizon, max_windows=10**6)
    norm = ((frame.to_numpy() - out["mean"]) / out["std"]).astype(np.float32)
    spans = {"train": (0, a), "val": (a, b), "test": (b, len(frame))}
    for name, (lo, hi) in spans.items():
        starts = out[f"{name}_starts"]
        assert starts.min() >= max(lo, window) and starts.max() + horizon <= hi
        x, y, cid = out[name]
        assert len(x) == len(y) == len(cid) == 2 * len(starts)
        # the first window of the second client, checked against the normalised series
        k = len(starts)
        t = starts[0]
        assert cid[k] == 1
        np.testing.assert_allclose(x[k], norm[t - window:t, 1], atol=1e-5)
        np.testing.assert_allclose(y[k], norm[t:t + horizon, 1], atol=1e-5)
    # every hour of the training span after the first window is a training target; none of val/test is
    assert out["train_starts"].max() + horizon == a


def test_window_stride_caps_memory():
    out = el.prepare(_hourly(steps=400, clients=3), clients=2, window=24, horizon=6, max_windows=50)
    assert out["stride"] > 1 and all(len(out[s][0]) <= 50 for s in ("train", "val", "test"))
    assert out["clients"] == ["MT_000", "MT_001"]


def test_constant_client_is_dropped_and_too_short_series_is_an_error():
    frame = _hourly(steps=300, clients=3)
    frame["MT_001"] = 5.0
    out = el.prepare(frame, clients=0, window=24, horizon=6, max_windows=10**6)
    assert out["clients"] == ["MT_000", "MT_002"]
    with pytest.raises(DataError, match="too few"):
        el.prepare(_hourly(steps=40), clients=0, window=24, horizon=6, max_windows=100)


def test_metrics_match_sklearn_on_fixed_inputs():
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    pred = np.array([[0.5, -1.0], [2.0, 0.0], [0.0, 1.5]])
    target = np.array([[0.0, -1.0], [1.0, 1.0], [0.5, 1.0]])
    mean = np.array([10.0, 20.0, 10.0])
    std = np.array([2.0, 4.0, 2.0])
    m = el.regression_metrics(pred, target, mean, std)
    assert m["mae"] == pytest.approx(mean_absolute_error(target.ravel(), pred.ravel()))
    assert m["mae"] == pytest.approx((0.5 + 0 + 1 + 1 + 0.5 + 0.5) / 6)
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(target.ravel(), pred.ravel())))
    kw_pred, kw_target = pred * std[:, None] + mean[:, None], target * std[:, None] + mean[:, None]
    assert m["mae_kw"] == pytest.approx(mean_absolute_error(kw_target.ravel(), kw_pred.ravel()))
    assert m["mae_kw"] == pytest.approx((1 + 0 + 4 + 4 + 1 + 1) / 6)
    assert m["rmse_kw"] == pytest.approx(np.sqrt(mean_squared_error(kw_target.ravel(), kw_pred.ravel())))


def _ctx(data_dir, **options):
    task = el.ElectricityTask()
    preset = task.preset("smoke")
    return task, TaskContext(preset, task.resolve_options(preset, options), 0, "cpu", data_dir,
                             task.hparam_space().defaults())


def test_task_loads_generated_uci_file_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data" / "electricity"
    root.mkdir(parents=True)
    frame = readings(steps=4 * 24 * 10, clients=3)
    write_uci(root / "LD2011_2014.txt", frame)
    task, ctx = _ctx(tmp_path / "data", clients=2, window=12, horizon=3, max_windows=10**6)
    data = task.load_data(ctx)
    x, y, cid = data.train
    assert x.shape[1:] == (12, 1) and y.shape[1:] == (3,) and set(cid.tolist()) == {0, 1}
    assert data.info["data.clients"] == 2 and data.info["data.steps"] == 24 * 10
    hourly = el.resample(frame, "1h")
    a, _ = el.split_bounds(len(hourly))
    np.testing.assert_allclose(data.extra["mean"].numpy(), hourly.iloc[:a, :2].mean().to_numpy(), rtol=1e-5)
    model = task.build_model(data, ctx)
    assert model(x[:4]).shape == (4, 3)
    task.apply_model_hparam(model, "dropout", 0.2)
    assert model.dropout.p == 0.2
    metrics = task.evaluate(model, data, "val", ctx)
    assert set(metrics) == {"mae", "rmse", "mae_kw", "rmse_kw"}


def test_no_local_data_offline_names_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "cache"))
    task, ctx = _ctx(tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        task.load_data(ctx)


def test_declared_seed_defaults():
    task = el.ElectricityTask()
    hp = task.hparam_space().defaults()
    assert hp["lr"] == 0.01 and hp["batch_size"] == 128 and hp["dropout"] == 0.5
    assert task.option_specs()["hidden"].default == 64
    assert {k: task.metrics[k] for k in ("mae", "rmse", "mae_kw", "rmse_kw")} == dict.fromkeys(
        ("mae", "rmse", "mae_kw", "rmse_kw"), "min")


def test_cli_smoke_on_real_data(cli, data_dir):
    res = cli("run", "--task", "electricity", "--controller", "static", "--baseline", "none", "--preset", "smoke",
              "--data-dir", str(data_dir), "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    (run,) = json.loads(res.stdout)["runs"]
    for metric in ("mae", "rmse", "mae_kw", "rmse_kw"):
        assert np.isfinite(run["final"][f"test/{metric}"]) and run["final"][f"test/{metric}"] > 0
    assert run["final"]["test/mae_kw"] > run["final"]["test/mae"]  # kW loads are larger than z-scores here
