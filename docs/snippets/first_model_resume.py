import torch
from torch.utils.data import DataLoader, TensorDataset

import ember
from first_model import Regressor  # first_model.py, in the same folder

ember.seed_everything(0)  # the same data as first_model.py
x = torch.randn(1024, 8)
y = x.sum(dim=1, keepdim=True)
train = DataLoader(TensorDataset(x[:896], y[:896]), batch_size=64, shuffle=True)
val = DataLoader(TensorDataset(x[896:], y[896:]), batch_size=64)

trainer = ember.Trainer(max_epochs=10, default_root_dir="runs/first")
trainer.fit(Regressor(), train, val, ckpt_path="last")  # epochs 6 to 10, steps 71 to 140
print(f"step {trainer.global_step}, val_loss {trainer.callback_metrics['val_loss']:.4f}")
