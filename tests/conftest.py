"""Shared fixtures. Tests write to tmp_path only and need no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _metacore_cache_dir(tmp_path_factory):
    """Decoded/tokenised data caches go to a per-session temporary directory, never ``~/.cache`` (subprocesses
    inherit it, so a test session decodes each data slice once)."""
    if "METACORE_CACHE_DIR" not in os.environ:
        os.environ["METACORE_CACHE_DIR"] = str(tmp_path_factory.mktemp("metacore-cache"))
        yield
        os.environ.pop("METACORE_CACHE_DIR", None)
    else:
        yield


def shared_data_dir() -> Path | None:
    """The real data beside the project (``../shared/data`` or ``METACORE_DATA_DIR``), or None."""
    env = os.environ.get("METACORE_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data (../shared/data or METACORE_DATA_DIR) not present")
    return path


@pytest.fixture
def memory_tracker():
    from metacore.core.tracking import MemoryTracker

    return MemoryTracker()


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    """The real ``metacore`` command in a subprocess (``python -m metacore``)."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": "", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v != ""}
    return subprocess.run([sys.executable, "-m", "metacore", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster than contending for the few cores (restored afterwards).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(tmp_path):
    """Run the CLI in ``tmp_path`` so the default store lands in ``tmp_path/mlflow_runs``."""

    def _run(*args: str, env: dict[str, str] | None = None, timeout: int = 300):
        return run_cli(*args, cwd=tmp_path, env=env, timeout=timeout)

    return _run


def fake_distribution(site: Path, dist: str, module: str, source: str) -> None:
    """An installed distribution with a ``metacore`` entry point, made by hand (no pip, no network)."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"  # the folder name carries the normalised name
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[metacore]\n{dist} = {module}\n")


def with_path(*folders: Path) -> str:
    """``PYTHONPATH`` with ``folders`` first, keeping the one this test session runs under (the code under test)."""
    return os.pathsep.join([*map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])])
