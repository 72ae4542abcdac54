"""``digits``: scikit-learn's bundled real handwritten digits (1,797 8x8 images), a small CNN, SGD with momentum.

It needs no network and trains in seconds, so it is the offline demo and the fast test task. The train/val/test
split (60/20/20) is stratified and drawn from the run's seed.
"""

from __future__ import annotations

from metacore.core.hookspecs import hookimpl
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.options import OptionSpec
from metacore.core.task import Preset, Task, TaskContext, TaskData


class DigitsTask(Task):
    """Handwritten digits (scikit-learn, 8x8), small CNN."""

    name = "digits"
    description = "scikit-learn's real 8x8 handwritten digits, small CNN, SGD (offline demo)"
    primary_metric = "accuracy"
    metrics = {"accuracy": "max", "f1_macro": "max"}

    def hparam_space(self) -> HParamSpace:
        return HParamSpace([
            HParamSpec("lr", 1e-2, 1e-6, 100.0, log=True, help="SGD learning rate"),
            HParamSpec("momentum", 0.9, 0.0, 0.999, help="SGD momentum"),
            HParamSpec("weight_decay", 0.0, 0.0, 0.1, help="L2 weight decay"),
            HParamSpec("dropout", 0.0, 0.0, 0.9, acts_on="model", help="dropout before the classifier"),
            HParamSpec("batch_size", 64, 8, 512, acts_on="data", integer=True, help="examples per step"),
        ], owner="task digits")

    def option_specs(self) -> dict[str, OptionSpec]:
        return {"width": OptionSpec("width", 16, int, "channels of the first conv layer", 2, 256)}

    def presets(self) -> dict[str, Preset]:
        return {
            "full": Preset("full", steps=2000, eval_interval=100, log_interval=10, checkpoint_interval=500,
                           options={"width": 32}, description="wider CNN, about 120 epochs"),
            "small": Preset("small", steps=600, eval_interval=50, log_interval=10, checkpoint_interval=200,
                            options={"width": 16}, description="about 35 epochs, a minute on a laptop CPU"),
            "smoke": Preset("smoke", steps=40, eval_interval=20, log_interval=5, options={"width": 8},
                            description="seconds, for tests"),
        }

    def load_data(self, ctx: TaskContext) -> TaskData:
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        idx = list(range(len(y)))
        train_idx, rest = train_test_split(idx, test_size=0.4, stratify=digits.target, random_state=ctx.seed)
        val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=digits.target[rest],
                                             random_state=ctx.seed)
        mean, std = x[train_idx].mean(), x[train_idx].std()
        x = (x - mean) / std

        def part(ids):
            ids = torch.tensor(ids)
            return (x[ids], y[ids])

        return TaskData(train=part(train_idx), val=part(val_idx), test=part(test_idx),
                        info={"data.source": "sklearn.datasets.load_digits", "data.train": len(train_idx),
                              "data.val": len(val_idx), "data.test": len(test_idx)})

    def build_model(self, data: TaskData, ctx: TaskContext):
        import torch.nn as nn

        w = ctx.options["width"]
        return nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(ctx.hparams.get("dropout", 0.0)),
            nn.Linear(2 * w * 16, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def build_optimizer(self, model, hparams, ctx: TaskContext):
        import torch

        return torch.optim.SGD(model.parameters(), lr=hparams["lr"], momentum=hparams["momentum"],
                               weight_decay=hparams["weight_decay"])


@hookimpl
def metacore_register_tasks(register):
    register(DigitsTask)
