"""``electricity``: day-ahead load forecasting on UCI ElectricityLoadDiagrams20112014 with an LSTM — the seed's task.

Pipeline (each step chosen so nothing from validation or test leaks into training):

1. Read the 15-minute kW readings: the original UCI ``LD2011_2014.txt`` (``;``-separated, ``,`` decimals, an unnamed
   first column of timestamps) or the CSV subset of ``shared/data`` (``timestamp`` column first).
2. Keep readings from ``start`` on, resample to ``resample`` (default hourly: the mean kW of the four readings of each
   hour, labelled at the hour's end as UCI labels readings; incomplete hours are dropped), keep the first ``clients``
   clients whose training span is not constant.
3. Split time chronologically: the first 70 % of hours for training, the next 10 % validation, the last 20 % test.
4. Normalise each client with the mean and standard deviation of its **training span only**.
5. Cut sliding windows: ``window`` hours of history (default 168, one week) -> the next ``horizon`` hours (default 24,
   a day ahead). A window belongs to the split that holds all of its targets; its history may reach back into an
   earlier split (that is the past, known at forecast time), never forward.

The model is one global LSTM over all clients (univariate input, 64 hidden units, dropout 0.5 on its last hidden state,
a linear head to ``horizon`` outputs), trained on MSE. Metrics: ``mae``/``rmse`` on the normalised scale and
``mae_kw``/``rmse_kw`` in kW after undoing each client's normalisation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from metacore.core.errors import DataError
from metacore.core.hookspecs import hookimpl
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.options import OptionSpec
from metacore.core.task import Preset, Task, TaskContext, TaskData
from metacore.plugins import data as dl

UCI_URL = "https://archive.ics.uci.edu/static/public/321/electricityloaddiagrams20112014.zip"
EXPECTED = "electricity/LD2011_2014.txt (UCI) or electricity/*.csv.gz (the 45-client subset)"
SPLITS = (0.7, 0.1, 0.2)


class ElectricityTask(Task):
    """UCI electricity load, global LSTM forecaster, Adam."""

    name = "electricity"
    description = "UCI electricity load (LD2011_2014), LSTM 64 hidden, 168h -> 24h ahead, Adam lr 1e-2"
    primary_metric = "mae"
    metrics = {"mae": "min", "rmse": "min", "mae_kw": "min", "rmse_kw": "min"}
    eval_batch_size = 1024

    def hparam_space(self) -> HParamSpace:
        return HParamSpace([
            HParamSpec("lr", 1e-2, 1e-6, 1.0, log=True, help="Adam learning rate"),
            HParamSpec("beta1", 0.9, 0.0, 0.999, group_key="betas", index=0, help="Adam beta1 (momentum)"),
            HParamSpec("weight_decay", 0.0, 0.0, 0.1, help="Adam (coupled) L2 weight decay"),
            HParamSpec("dropout", 0.5, 0.0, 0.9, acts_on="model", help="dropout on the LSTM's last hidden state"),
            HParamSpec("batch_size", 128, 8, 4096, acts_on="data", integer=True, help="windows per step"),
        ], owner="task electricity")

    def option_specs(self) -> dict[str, OptionSpec]:
        return {
            "hidden": OptionSpec("hidden", 64, int, "LSTM hidden units", 1, 4096),
            "layers": OptionSpec("layers", 1, int, "stacked LSTM layers", 1, 8),
            "clients": OptionSpec("clients", 0, int, "first N usable clients (0: all)", 0, 400),
            "resample": OptionSpec("resample", "1h", str, "time step: 15min (raw), 1h, ... (pandas offset)"),
            "window": OptionSpec("window", 168, int, "history steps per window", 2, 10000),
            "horizon": OptionSpec("horizon", 24, int, "steps predicted per window", 1, 1000),
            "start": OptionSpec("start", "2012-01-01", str, "first timestamp used (ISO date; '' = all)"),
            "max_windows": OptionSpec("max_windows", 500000, int, "cap on windows per split (a larger window "
                                      "stride beyond it, to bound memory on the full UCI file)", 1, None),
        }

    def presets(self) -> dict[str, Preset]:
        return {
            "full": Preset("full", steps=5000, eval_interval=250, log_interval=25, checkpoint_interval=1000,
                           options={"clients": 0, "hidden": 64, "window": 168, "horizon": 24},
                           description="all clients of the data, hourly, 168h -> 24h, LSTM 64"),
            "small": Preset("small", steps=400, eval_interval=50, log_interval=10, checkpoint_interval=200,
                            options={"clients": 16, "hidden": 64, "window": 168, "horizon": 24},
                            description="first 16 clients, hourly, 168h -> 24h, LSTM 64, 400 steps"),
            "smoke": Preset("smoke", steps=10, eval_interval=5, log_interval=5,
                            options={"clients": 2, "hidden": 8, "window": 24, "horizon": 6, "max_windows": 256},
                            description="2 clients, 24h -> 6h, LSTM 8, at most 256 windows per split; seconds"),
        }

    # ------------------------------------------------------------------------------------------------ data
    def load_data(self, ctx: TaskContext) -> TaskData:
        import torch

        opts = ctx.options
        frame, source = load_frame(ctx.data_dir, opts["resample"], opts["start"])
        prepared = prepare(frame, clients=opts["clients"], window=opts["window"], horizon=opts["horizon"],
                           max_windows=opts["max_windows"])
        device = ctx.device

        def split(name: str) -> tuple:
            x, y, cid = prepared[name]
            return (torch.as_tensor(x).unsqueeze(-1).to(device), torch.as_tensor(y).to(device),
                    torch.as_tensor(cid).to(device))

        info = {"preset.description": ctx.preset.description,
                "data.source": source, "data.clients": len(prepared["clients"]),
                "data.steps": prepared["steps"], "data.resample": opts["resample"],
                "data.first": str(frame.index[0]), "data.last": str(frame.index[-1]),
                "data.split": "chronological 70/10/20", "data.normalise": "per client, training span only",
                "data.window": opts["window"], "data.horizon": opts["horizon"],
                "data.stride": prepared["stride"],
                "data.train": len(prepared["train"][0]), "data.val": len(prepared["val"][0]),
                "data.test": len(prepared["test"][0])}
        return TaskData(train=split("train"), val=split("val"), test=split("test"), info=info,
                        extra={"mean": torch.as_tensor(prepared["mean"]), "std": torch.as_tensor(prepared["std"]),
                               "clients": prepared["clients"]})

    # ------------------------------------------------------------------------------------------------ model
    def build_model(self, data: TaskData, ctx: TaskContext):
        return lstm_forecaster(ctx.options["hidden"], ctx.options["layers"], ctx.options["horizon"],
                               float(ctx.hparams.get("dropout", 0.5)))

    def build_optimizer(self, model, hparams, ctx: TaskContext):
        import torch

        return torch.optim.Adam(model.parameters(), lr=hparams["lr"], betas=(hparams["beta1"], 0.999),
                                weight_decay=hparams["weight_decay"], fused=ctx.on_cuda or None)

    def loss(self, model, batch: tuple):
        import torch.nn.functional as F

        return F.mse_loss(model(batch[0]), batch[1])

    def evaluate(self, model, data: TaskData, split: str, ctx: TaskContext) -> dict[str, float]:
        import torch

        preds, targets, cids = [], [], []
        with torch.no_grad():
            for batch in self.eval_batches(data, split, ctx):
                preds.append(model(batch[0]).float().cpu())
                targets.append(batch[1].cpu())
                cids.append(batch[2].cpu())
        cid = torch.cat(cids)
        return regression_metrics(torch.cat(preds).numpy(), torch.cat(targets).numpy(),
                                  data.extra["mean"][cid].numpy(), data.extra["std"][cid].numpy())


# ---------------------------------------------------------------------------------------------------- metrics
def regression_metrics(pred, target, mean, std) -> dict[str, float]:
    """MAE/RMSE on the normalised scale and, after ``x * std + mean`` per window (client), in kW (scikit-learn)."""
    import numpy as np
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    scale = np.asarray(std, dtype=np.float64).reshape(-1, *([1] * (pred.ndim - 1)))
    shift = np.asarray(mean, dtype=np.float64).reshape(-1, *([1] * (pred.ndim - 1)))
    p, t = pred.reshape(len(pred), -1), target.reshape(len(target), -1)
    pk, tk = (pred * scale + shift).reshape(len(pred), -1), (target * scale + shift).reshape(len(target), -1)
    return {"mae": float(mean_absolute_error(t.ravel(), p.ravel())),
            "rmse": float(np.sqrt(mean_squared_error(t.ravel(), p.ravel()))),
            "mae_kw": float(mean_absolute_error(tk.ravel(), pk.ravel())),
            "rmse_kw": float(np.sqrt(mean_squared_error(tk.ravel(), pk.ravel())))}


# ---------------------------------------------------------------------------------------------------- reading
def find_source(root: Path) -> Path:
    """The UCI text file if present (full data), else the CSV subset."""
    for pattern in ("LD2011_2014.txt", "LD2011_2014.txt.gz", "LD2011_2014*.txt*"):
        hits = sorted(root.glob(pattern))
        if hits:
            return hits[0]
    hits = sorted(p for p in root.glob("*.csv*") if re.search(r"ld2011|electricity", p.name, re.I))
    if hits:
        return hits[0]
    raise DataError(f"electricity: {root} holds no LD2011_2014.txt and no ld2011_2014*.csv(.gz) file "
                    f"(expected {EXPECTED})")


def read_readings(path: Path):
    """15-minute readings as a float DataFrame indexed by timestamp, one column per client.

    Two formats: UCI's ``LD2011_2014.txt`` (``;`` separator, ``,`` decimal, unnamed first column) and the CSV subset
    (``,`` separator, ``.`` decimal, a ``timestamp`` first column). The separator is sniffed from the header line.
    """
    import gzip

    import pandas as pd

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            header = f.readline()
    except OSError as exc:
        raise DataError(f"electricity: cannot read {path}: {exc}") from None
    uci = header.count(";") > header.count(",")
    try:
        frame = pd.read_csv(path, sep=";" if uci else ",", decimal="," if uci else ".", index_col=0,
                            low_memory=False)
        frame.index = pd.to_datetime(frame.index)
    except Exception as exc:
        raise DataError(f"electricity: {path} is not in the UCI or subset format: {exc}") from None
    frame.index.name = "timestamp"
    frame = frame.apply(pd.to_numeric, errors="coerce").astype("float64")
    if frame.shape[1] == 0 or len(frame) == 0:
        raise DataError(f"electricity: {path} holds no client columns or no rows")
    if frame.isna().any().any():
        bad = frame.columns[frame.isna().any()].tolist()
        raise DataError(f"electricity: {path} has missing or non-numeric readings in {', '.join(bad[:5])}")
    return frame.sort_index()


def resample(frame, rule: str):
    """Mean kW per ``rule`` interval, labelled at its end (UCI's convention); incomplete intervals dropped."""
    import pandas as pd

    if rule in ("", "15min", "15T", "none"):
        return frame
    try:
        step = pd.tseries.frequencies.to_offset(rule)
    except ValueError:
        raise DataError(f"electricity: resample={rule!r} is not a pandas offset (e.g. 15min, 1h, 1D)") from None
    native = frame.index.to_series().diff().median()
    per_bin = max(1, int(round(pd.Timedelta(step) / native)))
    grouped = frame.resample(rule, closed="right", label="right")
    counts = grouped.count().iloc[:, 0]
    return grouped.mean()[counts == per_bin]


def load_frame(data_dir: Path | None, rule: str, start: str):
    """Readings resampled to ``rule`` from ``start`` on (cached: the UCI file takes a minute to parse)."""
    import pandas as pd

    root = dl.local_dir(data_dir, "electricity")
    if root is not None:
        path = find_source(root)
        source = f"local {path}"
    else:
        path = _download_uci()
        source = f"UCI archive {UCI_URL}"
    key = dl.cache_key(file=dl.file_identity([path]), rule=rule, start=start, v=1)

    def build() -> dict[str, Any]:
        import torch

        frame = read_readings(path)
        if start:
            try:
                frame = frame[frame.index >= pd.Timestamp(start)]
            except ValueError:
                raise DataError(f"electricity: start={start!r} is not a date") from None
        frame = resample(frame, rule)
        return {"values": torch.from_numpy(frame.to_numpy(dtype="float64").copy()), "columns": list(frame.columns),
                "index": [int(t) for t in frame.index.asi8]}

    out = dl.cached("electricity", key, build)
    frame = pd.DataFrame(out["values"].numpy(), columns=out["columns"],
                         index=pd.to_datetime(out["index"]))
    if len(frame) == 0:
        raise DataError(f"electricity: no readings left in {path} after start={start!r}")
    return frame, source


def _download_uci() -> Path:
    """The UCI archive, downloaded once into the cache; DataError naming --data-dir when it cannot be."""
    import urllib.request
    import zipfile

    target = dl.cache_dir("electricity", "LD2011_2014.txt")
    if target.is_file():
        return target
    if dl.offline():
        raise dl.missing_data("electricity", EXPECTED, f"the UCI archive ({UCI_URL})", "offline mode is set")
    archive = target.with_suffix(".zip.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(UCI_URL, timeout=30) as response, open(archive, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        with zipfile.ZipFile(archive) as z:
            member = next(n for n in z.namelist() if n.endswith("LD2011_2014.txt"))
            tmp = target.with_suffix(".tmp")
            with z.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        tmp.replace(target)
    except Exception as exc:
        raise dl.missing_data("electricity", EXPECTED, f"the UCI archive ({UCI_URL})",
                              f"{type(exc).__name__}: {exc}") from None
    finally:
        archive.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------------- preparing
def split_bounds(steps: int) -> tuple[int, int]:
    """Chronological split points: [0, a) train, [a, b) validation, [b, steps) test."""
    a = int(steps * SPLITS[0])
    b = int(steps * (SPLITS[0] + SPLITS[1]))
    return a, b


def prepare(frame, *, clients: int, window: int, horizon: int, max_windows: int) -> dict[str, Any]:
    """Normalise per client on the training span, then cut windows per split (see the module docstring)."""
    import numpy as np

    values = frame.to_numpy(dtype=np.float64)  # (T, C)
    steps = values.shape[0]
    a, b = split_bounds(steps)
    if b - a < horizon or steps - b < horizon or a < window + horizon:
        raise DataError(f"electricity: {steps} time steps are too few for window {window} + horizon {horizon} "
                        f"with a 70/10/20 split (validation span {b - a}, test span {steps - b})")
    mean = values[:a].mean(axis=0)
    std = values[:a].std(axis=0)
    usable = np.flatnonzero(std > 1e-8)  # a client constant over the training span cannot be normalised
    if clients:
        usable = usable[:clients]
    if len(usable) == 0:
        raise DataError("electricity: no client varies over the training span")
    names = [str(frame.columns[i]) for i in usable]
    mean, std = mean[usable], std[usable]
    norm = ((values[:, usable] - mean) / std).astype(np.float32)  # (T, C')

    # a window's targets start at t (history [t - window, t)); it belongs to the split holding [t, t + horizon)
    spans = {"train": (window, a - horizon + 1), "val": (a, b - horizon + 1), "test": (b, steps - horizon + 1)}
    n_clients = len(usable)
    stride = 1
    for lo, hi in spans.values():
        count = max(0, hi - lo) * n_clients
        stride = max(stride, -(-count // max_windows))
    out: dict[str, Any] = {"clients": names, "mean": mean.astype(np.float32), "std": std.astype(np.float32),
                           "steps": steps, "stride": stride, "bounds": (a, b)}
    for name, (lo, hi) in spans.items():
        starts = np.arange(lo, hi, stride)
        hist = np.arange(-window, 0)[None, :] + starts[:, None]  # (W, window)
        fut = np.arange(horizon)[None, :] + starts[:, None]      # (W, horizon)
        x = norm[hist].transpose(2, 0, 1).reshape(-1, window)    # (C' * W, window), client-major
        y = norm[fut].transpose(2, 0, 1).reshape(-1, horizon)
        cid = np.repeat(np.arange(n_clients, dtype=np.int64), len(starts))
        out[name] = (np.ascontiguousarray(x), np.ascontiguousarray(y), cid)
        out[f"{name}_starts"] = starts
    return out


# ---------------------------------------------------------------------------------------------------- model
def lstm_forecaster(hidden: int = 64, layers: int = 1, horizon: int = 24, dropout: float = 0.5):
    """LSTM over the history (B, window, 1) -> dropout on the last hidden state -> linear to (B, horizon)."""
    import torch.nn as nn

    class LSTMForecaster(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(1, hidden, num_layers=layers, batch_first=True)
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(hidden, horizon)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(self.dropout(out[:, -1]))

    return LSTMForecaster()


@hookimpl
def metacore_register_tasks(register):
    register(ElectricityTask)
