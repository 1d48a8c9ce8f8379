import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ember


class Regressor(ember.TrainModule):
    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()  # recorded in the checkpoints and the logs
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


if __name__ == "__main__":
    ember.seed_everything(0)  # the data below is drawn from it
    x = torch.randn(1024, 8)
    y = x.sum(dim=1, keepdim=True)
    train = DataLoader(TensorDataset(x[:896], y[:896]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[896:], y[896:]), batch_size=64)

    trainer = ember.Trainer(max_epochs=5, default_root_dir="runs/first")
    trainer.fit(Regressor(), train, val)
    if trainer.is_global_zero:  # once, also when several processes run this script
        print(f"val_loss {trainer.callback_metrics['val_loss']:.4f}")
        print("logs in", trainer.log_dir)
        print("checkpoint", trainer.checkpoint_callback.last_model_path)
