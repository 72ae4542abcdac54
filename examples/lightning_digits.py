"""A Lightning model on scikit-learn's real handwritten digits, with metacore's hypergrad setting its learning rate.

    pip install "metacore[lightning]"
    python examples/lightning_digits.py            # MLflow store: sqlite:///mlflow_runs/mlflow.db

docs/lightning.md walks through it; the one line that adds metacore is marked.
"""

from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from metacore.integrations.lightning import MetacoreCallback


class Digits(L.LightningDataModule):
    """The 1,797 8x8 images scikit-learn ships: 60% train, 20% validation, 20% test, split by ``seed``."""

    def __init__(self, batch_size: int = 64, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle

    def setup(self, stage: str | None = None) -> None:
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
        train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
        x = (x - x[train].mean()) / x[train].std()
        self.train, self.val, self.test = (TensorDataset(x[i], y[i]) for i in (train, val, test))

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, self.batch_size, shuffle=self.shuffle, generator=gen, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, 256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, 256)


class DigitsNet(L.LightningModule):
    """A small CNN, SGD with momentum (the seed's setup of metacore's ``digits`` task)."""

    def __init__(self, lr: float = 1e-2, momentum: float = 0.9, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _evaluate(self, batch, split: str) -> None:
        x, y = batch
        logits = self.net(x)
        self.log(f"{split}_loss", F.cross_entropy(logits, y))
        self.log(f"{split}_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def main(lr: float = 1e-2, seed: int = 0, max_epochs: int = 35, tracking_uri: str = "sqlite:///mlflow_runs/mlflow.db"):
    L.seed_everything(seed)
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", log_every_n_steps=10, default_root_dir="mlflow_runs",
        logger=MLFlowLogger(experiment_name="digits-lightning", tracking_uri=tracking_uri),
        callbacks=[MetacoreCallback("hypergrad", monitor="val_loss")],  # <- the added line
    )
    model, data = DigitsNet(lr=lr), Digits(seed=seed)
    trainer.fit(model, datamodule=data)
    return trainer.test(model, datamodule=data)[0]


if __name__ == "__main__":
    Path("mlflow_runs").mkdir(exist_ok=True)  # where the default MLflow store goes
    print(main())
