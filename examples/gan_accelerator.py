"""The GAN of ``gan.py`` (a ring of 8 Gaussians), trained by a hand-written loop.

No Trainer here: two models, two optimizers and the loop are yours; ``ember.Accelerator``
handles the device, mixed precision (one GradScaler for both optimizers under fp16),
gradient accumulation over both models and per-model clipping, in the style of the Hugging
Face Accelerate tutorials. The data and models are imported from ``gan.py``.

Run it (about ten seconds on a CPU)::

    python examples/gan_accelerator.py
    python examples/gan_accelerator.py --mixed-precision fp16 --gradient-accumulation-steps 2
"""

from __future__ import annotations

import argparse
import time

import torch
from gan import (
    MODES,
    STD,
    Discriminator,
    Generator,
    adversarial_loss,
    mode_metrics,
    ring_of_gaussians,
    sample,
)
from torch.utils.data import DataLoader

from ember import Accelerator, seed_everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="default: EMBER_MIXED_PRECISION, then the `ember config` file, then 'no'",
    )
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4096, help="points in the data set")
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm per model")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.cpu,
    )
    seed_everything(args.seed)

    loader = DataLoader(
        ring_of_gaussians(args.samples, seed=args.seed),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
    )
    gen = Generator(args.latent_dim)
    disc = Discriminator()
    betas = (0.5, 0.999)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=betas)
    # Both models placed, both optimizers wrapped (stepping at the end of each window, with
    # one GradScaler between them under fp16), batches delivered on the device.
    gen, disc, opt_g, opt_d, loader = accelerator.prepare(gen, disc, opt_g, opt_d, loader)
    accelerator.print(
        f"{args.samples} points around {MODES} modes; device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision!r}"
    )

    step = 0
    while step < args.max_steps:
        for (real,) in loader:
            z = torch.randn(real.shape[0], args.latent_dim, device=accelerator.device)
            with accelerator.accumulate(gen, disc):
                # Discriminator: real points are real, generated points are not.
                with accelerator.autocast():
                    fake = gen(z)
                    d_loss = adversarial_loss(disc(real), True) + adversarial_loss(
                        disc(fake.detach()), False
                    )
                accelerator.backward(d_loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(disc.parameters(), args.clip)
                opt_d.step()
                opt_d.zero_grad()

                # Generator: make the discriminator call the generated points real. The
                # discriminator is frozen meanwhile, so its accumulating gradient only holds
                # its own loss.
                disc.requires_grad_(False)
                with accelerator.autocast():
                    g_loss = adversarial_loss(disc(fake), True)
                accelerator.backward(g_loss)
                disc.requires_grad_(True)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(gen.parameters(), args.clip)
                opt_g.step()
                opt_g.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % 100 == 0 or step == args.max_steps:
                accelerator.print(
                    f"step {step}: d_loss {d_loss.item():.3f}, g_loss {g_loss.item():.3f}"
                )
            if step == args.max_steps:
                break

    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(gen)
        assert isinstance(unwrapped, Generator)
        distance, covered = mode_metrics(sample(unwrapped, 1000, seed=args.seed))
        print(f"mean distance to the nearest mode: {distance:.4f} (data: about {STD * 1.25:.4f})")
        print(f"modes covered: {covered}/{MODES}")
        print(f"{step} steps in {time.perf_counter() - started:.1f} s")
    accelerator.end_training()


if __name__ == "__main__":
    main()
