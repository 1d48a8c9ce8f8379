import torch
from torch.utils.data import DataLoader

from ember import Trainer, TrainModule
from gan import Discriminator, Generator, adversarial_loss, ring_of_gaussians  # examples/gan.py


class GAN(TrainModule):
    def __init__(self, lr=1e-3, clip_val=1.0):
        super().__init__()
        self.automatic_optimization = False  # training_step steps the optimizers itself
        self.clip_val = clip_val
        self.lr = lr
        self.generator = Generator()
        self.discriminator = Discriminator()

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()  # in the order configure_optimizers returned them
        z = torch.randn(real.shape[0], 8, device=real.device)

        # Discriminator: while opt_d is toggled only its parameters require gradients.
        self.toggle_optimizer(opt_d)
        fake = self.generator(z)
        d_loss = adversarial_loss(self.discriminator(real), True) + adversarial_loss(
            self.discriminator(fake.detach()), False
        )
        self.manual_backward(d_loss)
        self.clip_gradients(opt_d, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

        # Generator: make the discriminator call the generated points real.
        self.toggle_optimizer(opt_g)
        g_loss = adversarial_loss(self.discriminator(self.generator(z)), True)
        self.manual_backward(g_loss)
        self.clip_gradients(opt_g, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)

        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, prog_bar=True)

    def configure_optimizers(self):
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=betas),
        ]


if __name__ == "__main__":
    loader = DataLoader(ring_of_gaussians(512), batch_size=64, shuffle=True)
    trainer = Trainer(max_steps=40, precision="16-mixed", default_root_dir="runs/gan")
    trainer.fit(GAN(), loader)
    print(f"{trainer.global_step} steps, d_loss {trainer.callback_metrics['d_loss']:.3f}")
