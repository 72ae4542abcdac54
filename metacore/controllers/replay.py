"""``replay``: plays back the ``hparam/*`` trajectory logged by another run, so a schedule found once (a PBT winner
from ``metacore tune``, a ``hypergrad`` run) can be reused in a fresh run without the search.

``--controller-set from=RUN_ID`` names the run (a training child of ``metacore run``/``bench``, a trial of
``metacore tune``, or a ``tune`` parent, which holds the winner's schedule). The store is the run's own
(``--tracking-uri``) unless ``--controller-set tracking_uri=URI`` says otherwise.

A value logged at step ``S`` is the one the update of step ``S`` used, so before the update of step ``t`` the
replay sets the value logged at the first logged step ``S >= t`` (after the last one: the last value). At every step
the source logged, the replayed run therefore uses, and logs, exactly the source's value; between logged steps the
value is held piecewise constant (a controller that changed it every step, like ``hypergrad``, is replayed at the
resolution it was logged at).
"""

from __future__ import annotations

import bisect
import functools
from typing import Any, Mapping

from metacore.core.controller import Controller
from metacore.core.errors import ControllerError, MetacoreError, UsageError
from metacore.core.hookspecs import hookimpl
from metacore.core.hparams import HParamSpace
from metacore.core.options import OptionSpec
from metacore.core.state import TrainingState
from metacore.core.store import default_tracking_uri

PREFIX = "hparam/"


class ReplayController(Controller):
    """Replays the logged ``hparam/*`` trajectory of another run."""

    name = "replay"
    description = "replays the hparam/* trajectory of a logged run (from=RUN_ID)"
    options = {
        "from": OptionSpec("from", "", str, "the run whose hparam/* metrics are replayed"),
        "tracking_uri": OptionSpec("tracking_uri", "", str, "the MLflow store of that run (default: this run's)"),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        run_id = self.config["from"].strip()
        if not run_id:
            raise UsageError("controller replay needs --controller-set from=RUN_ID (a run with hparam/* metrics)")
        self.trajectory = load_trajectory(self.config["tracking_uri"] or None, run_id)
        self._steps = {name: [s for s, _ in points] for name, points in self.trajectory.items()}

    def reset(self, hparams: Mapping[str, float], seed: int, space: HParamSpace, budget: int) -> None:
        super().reset(hparams, seed, space, budget)
        if not any(name in space for name in self.trajectory):
            raise ControllerError(f"run {self.config['from']} logged hparam/{', hparam/'.join(self.trajectory)}, "
                                  f"none of which this task has ({', '.join(space.names())})")

    def value_at(self, name: str, update: int) -> float:
        """The logged value in force for the update of step ``update`` (1-based)."""
        points, steps = self.trajectory[name], self._steps[name]
        i = bisect.bisect_left(steps, update)
        return points[min(i, len(points) - 1)][1]

    def act(self, state: TrainingState) -> dict[str, Any]:
        changes = {}
        for name in self.trajectory:
            if self.space is not None and name in self.space:
                value = self.value_at(name, state.step + 1)
                if value != state.hparams.get(name):
                    changes[name] = value
        return changes


@functools.lru_cache(maxsize=16)
def load_trajectory(uri: str | None, run_id: str) -> dict[str, tuple[tuple[int, float], ...]]:
    """``{name: ((step, value), ...)}`` of every ``hparam/<name>`` metric of the run, in step order (the last value
    logged at a step wins). UsageError if there is no such run or it logged no ``hparam/*`` metric."""
    from metacore.core.tracking import MlflowTracker

    # metacore run passes its own store; used directly without one, the default store (MLFLOW_TRACKING_URI or
    # metacore's own)
    uri = uri or default_tracking_uri()
    try:
        store = MlflowTracker(uri, create=False)
        run = store.get_run(run_id)
    except MetacoreError:
        run = None
    if run is None:
        raise UsageError(f"controller replay: no run {run_id!r} in {uri}") from None
    names = sorted(k[len(PREFIX):] for k in run.metrics if k.startswith(PREFIX))
    if not names:
        raise UsageError(f"controller replay: run {run_id} has no hparam/* metrics to replay (a run parent? "
                         "pass one of its training runs, or a `metacore tune` parent)")
    return {name: tuple(sorted(dict(store.history(run_id, PREFIX + name)).items())) for name in names}


@hookimpl
def metacore_register_controllers(register):
    register(ReplayController)
