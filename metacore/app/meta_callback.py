"""The stable-baselines3 callback of meta-training: the progress bar (a line per 10% in a log file), the
meta-training curves logged to MLflow after every rollout (episode return and final validation score per task, over
the last 10 episodes; PPO's losses), the decisions' inner optimizer steps per task (the cost accounting of the policy
JSON) and the checkpoint every ``every`` PPO updates.

stable-baselines3 is imported only when the callback is built, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any


def _make_callback_base():
    from stable_baselines3.common.callbacks import BaseCallback

    return BaseCallback


class MetaTrainCallback:
    """Wrapped in :func:`MetaTrainCallback.__new__` into a stable-baselines3 callback: progress bar, MLflow curves,
    and the checkpoint every ``every`` updates (``save(updates)``, at the start of a rollout, i.e. right after an
    update)."""

    def __new__(cls, tracker: Any, run_id: str, total: int, progress: bool, log_floor: int = -1):
        base = _make_callback_base()

        class Curves(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.tracker, self.run_id, self.total = tracker, run_id, total
                self.returns: dict[str, list[float]] = {}
                self.scores: dict[str, list[float]] = {}
                self.episodes: dict[str, int] = {}
                self.inner_steps: dict[str, int] = {}
                self.ep_return: list[float] = []
                self.bar = None
                self.reported = 0
                self.started = time.perf_counter()
                self.log_floor = log_floor  # after a resume: steps the store already holds are not logged again
                self.every, self.save, self.n_epochs, self.updates_saved = 0, None, 1, 0
                if progress:
                    from metacore.app.progress import RunProgress

                    self.bar = RunProgress(unit="decisions")
                    self.bar_update = self.bar.start("meta-train", total)

            def _on_step(self) -> bool:
                infos, dones = self.locals.get("infos", []), self.locals.get("dones", [])
                rewards = self.locals.get("rewards")
                if not self.ep_return:
                    self.ep_return = [0.0] * len(infos)
                for i, info in enumerate(infos):
                    task = info.get("task", "?")
                    self.inner_steps[task] = (self.inner_steps.get(task, 0) + int(info.get("interval", 0))
                                             + int(info.get("teacher_steps", 0)))  # reward "teacher": its run
                    if bool(dones[i]):
                        ep = info.get("episode", {})
                        self.returns.setdefault(task, []).append(float(ep.get("r", 0.0)))
                        self.scores.setdefault(task, []).append(float(info.get("score", 0.0)))
                        self.episodes[task] = self.episodes.get(task, 0) + 1
                del rewards
                if self.bar is not None:
                    self.bar_update(min(self.num_timesteps, self.total))
                    tenth = 10 * self.num_timesteps // max(1, self.total)
                    if not self.bar.is_terminal and tenth > self.reported:  # a log file: a line per 10%
                        self.reported = tenth
                        print(f"meta-train: {self.num_timesteps}/{self.total} decisions, "
                              f"{time.perf_counter() - self.started:.0f} s", file=sys.stderr, flush=True)
                return True

            def _on_rollout_start(self) -> None:
                updates = self.model._n_updates // max(1, self.n_epochs)
                if self.every and self.save is not None and updates > self.updates_saved \
                        and updates % self.every == 0:
                    self.save(updates)
                    self.updates_saved = updates

            def state_dict(self) -> dict[str, Any]:
                return {"returns": self.returns, "scores": self.scores, "episodes": self.episodes,
                        "inner_steps": self.inner_steps, "ep_return": self.ep_return, "reported": self.reported}

            def load_state_dict(self, state: dict[str, Any]) -> None:
                self.returns = {k: list(v) for k, v in state["returns"].items()}
                self.scores = {k: list(v) for k, v in state["scores"].items()}
                self.episodes, self.inner_steps = dict(state["episodes"]), dict(state["inner_steps"])
                self.ep_return, self.reported = list(state["ep_return"]), int(state["reported"])

            def _on_rollout_end(self) -> None:
                metrics: dict[str, float] = {}
                all_r = []
                for task, rs in self.returns.items():
                    recent = rs[-10:]
                    all_r += recent
                    metrics[f"meta/return/{task}"] = sum(recent) / len(recent)
                    sc = self.scores[task][-10:]
                    metrics[f"meta/score/{task}"] = sum(sc) / len(sc)
                    metrics[f"meta/episodes/{task}"] = float(self.episodes[task])
                if all_r:
                    metrics["meta/return"] = sum(all_r) / len(all_r)
                for k, v in self.model.logger.name_to_value.items():
                    if k.startswith("train/") and isinstance(v, (int, float)) and math.isfinite(v):
                        metrics[f"ppo/{k[len('train/'):]}"] = float(v)
                if metrics and self.num_timesteps > self.log_floor:
                    self.tracker.log_metrics(self.run_id, metrics, self.num_timesteps)

            def close(self) -> None:
                if self.bar is not None:
                    self.bar_update(min(self.num_timesteps, self.total))
                    self.bar.stop()
                    self.bar = None
                self.tracker.flush(self.run_id)

        return Curves()
