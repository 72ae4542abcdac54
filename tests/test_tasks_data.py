"""The shared data plumbing of the real-data tasks, and their CLI contract: listed with the seed's defaults, and a
clear exit 2 naming --data-dir when neither local data nor the network is there."""

from __future__ import annotations

import json

import pytest

from metacore.core.errors import DataError
from metacore.plugins import data as dl

TASKS = ("cifar10", "imdb", "electricity")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "c"))
    assert dl.cache_dir("x", "y.pt") == tmp_path / "c" / "x" / "y.pt"
    monkeypatch.delenv("METACORE_CACHE_DIR")
    assert dl.cache_dir().name == "metacore"


def test_cached_builds_once_and_rebuilds_a_damaged_file(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(5), "names": ["a", "b"]}

    key = dl.cache_key(files=[["f", 1, 2]], rows=5)
    first = dl.cached("ns", key, build)
    second = dl.cached("ns", key, build)
    assert len(calls) == 1 and torch.equal(first["x"], second["x"]) and second["names"] == ["a", "b"]
    (tmp_path / "ns" / f"{key}.pt").write_bytes(b"truncated")
    assert torch.equal(dl.cached("ns", key, build)["x"], torch.arange(5)) and len(calls) == 2
    assert dl.cache_key(a=1, b=[2]) == dl.cache_key(b=[2], a=1) != dl.cache_key(a=1, b=[3])


def test_offline_flags_and_local_dir(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "METACORE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert not dl.offline()
    monkeypatch.setenv("METACORE_OFFLINE", "1")
    assert dl.offline()
    (tmp_path / "imdb").mkdir()
    assert dl.local_dir(tmp_path, "imdb") == tmp_path / "imdb"
    assert dl.local_dir(tmp_path, "cifar10") is None and dl.local_dir(None, "imdb") is None


def test_missing_data_message_says_what_to_pass():
    err = dl.missing_data("cifar10", "cifar10/*.parquet", "the Hugging Face hub (uoft-cs/cifar10)", "offline")
    assert isinstance(err, DataError)
    assert "--data-dir" in str(err) and "METACORE_DATA_DIR" in str(err) and "cifar10/*.parquet" in str(err)


def test_hub_loader_offline_is_a_data_error_naming_data_dir(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="--data-dir"):
        dl.load_hub_dataset("imdb", "stanfordnlp/imdb", "imdb/*.parquet")


def test_list_json_shows_the_tasks_with_the_seed_defaults(cli):
    res = cli("list", "tasks", "--json")
    assert res.returncode == 0, res.stderr
    tasks = {t["name"]: t for t in json.loads(res.stdout)["tasks"]}
    for name in TASKS:
        assert tasks[name]["presets"] == ["full", "small", "smoke"]
    assert {k: tasks["cifar10"]["hparams"][k] for k in ("lr", "momentum", "weight_decay", "batch_size")} == {
        "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0001, "batch_size": 64}
    assert tasks["imdb"]["hparams"]["lr"] == 2e-05 and tasks["imdb"]["hparams"]["batch_size"] == 32
    assert tasks["imdb"]["options"]["max_length"] == 128 and tasks["imdb"]["options"]["warmup_steps"] == 1000
    assert tasks["electricity"]["hparams"]["lr"] == 0.01 and tasks["electricity"]["hparams"]["batch_size"] == 128
    assert tasks["electricity"]["hparams"]["dropout"] == 0.5 and tasks["electricity"]["options"]["hidden"] == 64


@pytest.mark.parametrize("task", [pytest.param("electricity"),  # each task's DataError is also tested in-process
                                  pytest.param("cifar10", marks=pytest.mark.slow),
                                  pytest.param("imdb", marks=pytest.mark.slow)])
def test_cli_without_data_or_network_exits_2_naming_data_dir(cli, tmp_path, task):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "METACORE_DATA_DIR": "",
           "METACORE_CACHE_DIR": str(tmp_path / "cache")}
    res = cli("run", "--task", task, "--controller", "static", "--baseline", "none", "--preset", "smoke",
              "--data-dir", str(empty), "--json", env=env)
    assert res.returncode == 2, res.stderr
    assert "--data-dir" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""
