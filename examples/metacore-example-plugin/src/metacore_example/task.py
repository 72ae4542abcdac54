"""``breast-cancer``: scikit-learn's Wisconsin diagnostic data (569 cases, 30 features), a small MLP, AdamW.

torch and scikit-learn are imported inside the methods, so registering the plugin costs nothing at start-up.
"""

from __future__ import annotations

from metacore import HParamSpace, HParamSpec, OptionSpec, Preset, Task, TaskContext, TaskData


class BreastCancerTask(Task):
    """Benign or malignant from 30 cell-nucleus features (scikit-learn's bundled real data)."""

    name = "breast-cancer"
    description = "Wisconsin breast-cancer diagnosis (scikit-learn, real), small MLP, AdamW"
    primary_metric = "accuracy"
    metrics = {"accuracy": "max", "f1_macro": "max"}

    def hparam_space(self) -> HParamSpace:
        return HParamSpace([
            HParamSpec("lr", 3e-3, 1e-6, 1.0, log=True, help="AdamW learning rate"),
            HParamSpec("beta1", 0.9, 0.0, 0.999, group_key="betas", index=0, help="AdamW first-moment decay"),
            HParamSpec("weight_decay", 1e-2, 0.0, 0.5, help="decoupled weight decay"),
            HParamSpec("dropout", 0.1, 0.0, 0.9, acts_on="model", help="dropout of the hidden layer"),
            HParamSpec("batch_size", 32, 4, 256, acts_on="data", integer=True, help="examples per step"),
        ], owner=f"task {self.name}")

    def option_specs(self) -> dict[str, OptionSpec]:
        return {"hidden": OptionSpec("hidden", 32, int, "hidden units of the MLP", 1, 4096)}

    def presets(self) -> dict[str, Preset]:
        return {
            "full": Preset("full", steps=1500, eval_interval=50, log_interval=10, options={"hidden": 128}),
            "small": Preset("small", steps=400, eval_interval=20, log_interval=10),
            "smoke": Preset("smoke", steps=40, eval_interval=10, log_interval=5, options={"hidden": 16},
                            description="seconds, for tests"),
        }

    def load_data(self, ctx: TaskContext) -> TaskData:
        import torch
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split

        x, y = load_breast_cancer(return_X_y=True)
        idx = list(range(len(y)))
        train, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=ctx.seed)
        val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=ctx.seed)
        x = torch.tensor(x, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)  # statistics of the training split only
        x = (x - mean) / std

        def part(ids):
            ids = torch.tensor(ids)
            return (x[ids], y[ids])

        return TaskData(train=part(train), val=part(val), test=part(test),
                        info={"data.source": "sklearn.datasets.load_breast_cancer", "data.train": len(train),
                              "data.val": len(val), "data.test": len(test)})

    def build_model(self, data: TaskData, ctx: TaskContext):
        import torch.nn as nn

        hidden = ctx.options["hidden"]
        return nn.Sequential(nn.Linear(data.train[0].shape[1], hidden), nn.ReLU(),
                             nn.Dropout(ctx.hparams.get("dropout", 0.0)), nn.Linear(hidden, 2))

    def build_optimizer(self, model, hparams, ctx: TaskContext):
        import torch

        return torch.optim.AdamW(model.parameters(), lr=hparams["lr"], betas=(hparams["beta1"], 0.999),
                                 weight_decay=hparams["weight_decay"])
