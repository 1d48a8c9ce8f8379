import torch
from torch import nn

from ember import Accelerator

model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
accelerator = Accelerator(log_with="tensorboard", project_dir="runs")
model, optimizer = accelerator.prepare(model, optimizer)
accelerator.init_trackers("trackers_demo", config={"lr": 0.1, "layers": 1})

x = torch.randn(64, 4, device=accelerator.device)
y = x.sum(dim=1, keepdim=True)
for step in range(20):
    loss = nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    accelerator.log({"train_loss": loss}, step=step)  # a 0-dim tensor or a number

accelerator.end_training()  # closes the trackers: runs/trackers_demo/ holds the event file
