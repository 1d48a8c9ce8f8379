from torch.utils.data import DataLoader

from ember import Trainer
from gan import GAN, ring_of_gaussians  # examples/gan.py, whose GAN is shown above

if __name__ == "__main__":
    loader = DataLoader(ring_of_gaussians(512), batch_size=64, shuffle=True)
    trainer = Trainer(max_steps=40, precision="16-mixed", default_root_dir="runs/gan")
    trainer.fit(GAN(), loader)
    print(f"{trainer.global_step} steps, d_loss {trainer.callback_metrics['d_loss']:.3f}")
