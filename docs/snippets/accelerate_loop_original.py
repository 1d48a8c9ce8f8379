import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accelerate import Accelerator
from accelerate.utils import set_seed

set_seed(0)
x = torch.randn(2048, 16)
y = (x[:, :4].sum(dim=1) > 0).long()
train_loader = DataLoader(TensorDataset(x[:1536], y[:1536]), batch_size=32, shuffle=True)
eval_loader = DataLoader(TensorDataset(x[1536:], y[1536:]), batch_size=64)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=100)

accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)
model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
    model, optimizer, train_loader, eval_loader, scheduler
)

for epoch in range(3):
    model.train()
    for inputs, targets in train_loader:
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(inputs), targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    model.eval()
    correct = total = 0
    for inputs, targets in eval_loader:
        with torch.no_grad():
            predictions = model(inputs).argmax(dim=1)
        predictions, targets = accelerator.gather_for_metrics((predictions, targets))
        correct += (predictions == targets).sum().item()
        total += targets.numel()
    accelerator.print(f"epoch {epoch}: accuracy {correct / total:.3f} on {total} samples")

accelerator.wait_for_everyone()
accelerator.save_model(model, "runs/loop")  # runs/loop/model.safetensors
accelerator.end_training()
