"""Tiny tasks that train in a fraction of a second on a CPU: a controller's contract runs on both an SGD-with-momentum
and an Adam optimizer."""

from __future__ import annotations

from typing import Mapping

from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.options import OptionSpec
from metacore.core.task import Preset, Task, TaskContext, TaskData


# ---------------------------------------------------------------------------------------------------- tiny tasks
class TinyTask(Task):
    """Three Gaussian blobs in 8 dimensions, a two-layer MLP, SGD with momentum: trains in well under a second."""

    name = "tiny"
    description = "three Gaussian blobs, a small MLP, SGD with momentum (metacore.testing)"
    primary_metric = "accuracy"
    metrics = {"accuracy": "max", "f1_macro": "max"}
    eval_batch_size = 256

    def hparam_space(self) -> HParamSpace:
        return HParamSpace([
            HParamSpec("lr", 0.05, 1e-5, 10.0, log=True, help="learning rate"),
            HParamSpec("momentum", 0.9, 0.0, 0.999, help="SGD momentum"),
            HParamSpec("weight_decay", 1e-4, 0.0, 0.1, help="L2 weight decay"),
            HParamSpec("dropout", 0.0, 0.0, 0.9, acts_on="model", help="dropout of the hidden layer"),
            HParamSpec("batch_size", 32, 4, 256, acts_on="data", integer=True, help="examples per step"),
        ], owner=f"task {self.name}")

    def option_specs(self) -> dict[str, OptionSpec]:
        return {"hidden": OptionSpec("hidden", 16, int, "hidden units", 1, 1024),
                "examples": OptionSpec("examples", 640, int, "examples in all splits", 30, 100_000)}

    def presets(self) -> dict[str, Preset]:
        return {
            "full": Preset("full", steps=600, eval_interval=100, log_interval=10, options={"hidden": 64}),
            "small": Preset("small", steps=200, eval_interval=50, log_interval=10),
            "smoke": Preset("smoke", steps=30, eval_interval=10, log_interval=5, description="a fraction of a second"),
        }

    def load_data(self, ctx: TaskContext) -> TaskData:
        import torch

        n = int(ctx.options.get("examples", 640))
        gen = torch.Generator().manual_seed(12345)  # a fixed problem; the trainer's data order follows the seed
        centers = torch.randn(3, 8, generator=gen) * 2.0
        y = torch.arange(n) % 3
        x = centers[y] + torch.randn(n, 8, generator=gen)
        perm = torch.randperm(n, generator=gen)
        x, y = x[perm], y[perm]
        a, b = int(0.6 * n), int(0.8 * n)
        return TaskData(train=(x[:a], y[:a]), val=(x[a:b], y[a:b]), test=(x[b:], y[b:]),
                        info={"data.source": "generated", "data.train": a, "data.val": b - a, "data.test": n - b})

    def build_model(self, data: TaskData, ctx: TaskContext):
        import torch.nn as nn

        h = int(ctx.options.get("hidden", 16))
        return nn.Sequential(nn.Linear(8, h), nn.ReLU(), nn.Dropout(ctx.hparams.get("dropout", 0.0)), nn.Linear(h, 3))

    def build_optimizer(self, model, hparams: Mapping[str, float], ctx: TaskContext):
        import torch

        return torch.optim.SGD(model.parameters(), lr=hparams["lr"], momentum=hparams["momentum"],
                               weight_decay=hparams["weight_decay"])


class TinyAdamTask(TinyTask):
    """The tiny task with Adam: ``beta1`` instead of ``momentum`` (controllers must cope with either)."""

    name = "tiny-adam"
    description = "three Gaussian blobs, a small MLP, Adam (metacore.testing)"

    def hparam_space(self) -> HParamSpace:
        return HParamSpace([
            HParamSpec("lr", 1e-2, 1e-6, 1.0, log=True, help="learning rate"),
            HParamSpec("beta1", 0.9, 0.0, 0.999, group_key="betas", index=0, help="Adam's first-moment decay"),
            HParamSpec("weight_decay", 0.0, 0.0, 0.1, help="L2 weight decay"),
            HParamSpec("batch_size", 32, 4, 256, acts_on="data", integer=True, help="examples per step"),
        ], owner=f"task {self.name}")

    def build_optimizer(self, model, hparams: Mapping[str, float], ctx: TaskContext):
        import torch

        return torch.optim.Adam(model.parameters(), lr=hparams["lr"], betas=(hparams["beta1"], 0.999),
                                weight_decay=hparams["weight_decay"])
