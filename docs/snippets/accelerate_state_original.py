import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accelerate import Accelerator
from accelerate.utils import set_seed


class Progress:
    """Where the loop stands; saved and restored with everything else."""

    def __init__(self):
        self.epoch, self.batches = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state):
        self.epoch, self.batches = state["epoch"], state["batches"]


def train(stop_at_batch=None, resume_from=None):
    set_seed(0)
    x = torch.randn(512, 8)
    y = x.sum(dim=1, keepdim=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.1), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if resume_from is not None:
        accelerator.load_state(resume_from)  # weights, optimizer, RNG states, progress

    for epoch in range(progress.epoch, 3):
        batches = loader
        if progress.batches:  # resumed mid-epoch: leave out what that epoch had consumed
            batches = accelerator.skip_first_batches(loader, progress.batches)
        for inputs, targets in batches:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(inputs), targets))
                optimizer.step()
                optimizer.zero_grad()
            progress.batches += 1
            if accelerator.sync_gradients and progress.batches == stop_at_batch:
                accelerator.save_state("runs/state")  # at a window boundary
                return None  # the process "dies" here
        progress.epoch, progress.batches = epoch + 1, 0
    return accelerator.unwrap_model(model).state_dict()


if __name__ == "__main__":
    uninterrupted = train()
    train(stop_at_batch=10)  # interrupted in its first epoch
    resumed = train(resume_from="runs/state")
    same = all(torch.equal(uninterrupted[key], resumed[key]) for key in uninterrupted)
    print(f"resumed run ends with the uninterrupted run's weights: {same}")
