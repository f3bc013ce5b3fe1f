"""A small LightningModule for ``examples/cli_config.yaml``:

    python examples/cli_model.py fit --config examples/cli_config.yaml
"""

from __future__ import annotations

import torch
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(LightningModule):
    """An MLP regressor on random data."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(256, 8, generator=g), torch.randn(256, 1, generator=g)), 32)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(Regressor, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
