import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule


class Regression(TrainModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights in both runs
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)  # a mean over the batch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train(batch_size, accumulate_grad_batches):
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    module = Regression()
    trainer = Trainer(
        max_epochs=3,
        accumulate_grad_batches=accumulate_grad_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=batch_size))
    return module.net.weight.detach(), trainer.global_step


if __name__ == "__main__":
    # 100 samples: 13 batches of 8 (the last holds 4) in windows of 4 batches (the last
    # window holds 1 batch), against batches of 32 (the last holds 4).
    accumulated, steps = train(batch_size=8, accumulate_grad_batches=4)
    big_batch, big_steps = train(batch_size=32, accumulate_grad_batches=1)
    print(f"optimizer steps: {steps} and {big_steps}")
    print(f"largest weight difference: {(accumulated - big_batch).abs().max():.1e}")
