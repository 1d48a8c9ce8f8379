import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ember


class Regression(ember.TrainModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


x = torch.randn(256, 3)
loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=32)
trainer = ember.Trainer(max_epochs=5, seed=0)
trainer.fit(Regression(), loader)  # logs, a progress bar and checkpoints in the working folder
