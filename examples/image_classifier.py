"""A small CNN on generated images: torchmetrics accuracy, early stopping, top-k checkpoints,
and a second run that resumes the first.

The images are made with torch from a seed (nothing is downloaded): 16x16 grey pictures of
four patterns (horizontal stripes, vertical stripes, diagonal stripes, a checkerboard), each
at a random phase, buried in Gaussian noise strong enough that one glance at a pixel says
nothing; a convolution that sees the pattern says a lot. Guessing scores 25%.

The first run trains for ``--epochs`` epochs with ``EarlyStopping`` on ``val_loss`` and a
``ModelCheckpoint`` that keeps the 3 best epochs by ``val_acc`` (plus ``last``). The second
run builds a new Trainer and a new, untrained module with ``--more-epochs`` more epochs and
calls ``fit(ckpt_path="last")``: it continues at the epoch where the first stopped, with the
weights, optimizer, early-stopping patience and top-3 list of the first.

Run it (about 7 s on two idle CPU cores)::

    python examples/image_classifier.py
    python examples/image_classifier.py --epochs 2 --more-epochs 2 --samples 512   # quick
    ember launch --num_processes 2 examples/image_classifier.py --strategy ddp     # see ddp.sh

``resume.sh`` uses ``--sigterm-after-step`` and ``--ckpt-path`` to stop a run by SIGTERM
and finish it in a second process.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from ember import Callback, Trainer, TrainModule
from ember.callbacks import EarlyStopping, ModelCheckpoint

# --- data ------------------------------------------------------------------------------------

CLASSES = ("horizontal", "vertical", "diagonal", "checkerboard")
SIZE = 16
PERIOD = 4  # pixels per stripe cycle


def patterns(phase: Tensor) -> Tensor:
    """The four clean patterns at each ``phase`` (in pixels): shape ``(len(phase), 4, S, S)``,
    values in [-1, 1]."""
    rows = torch.arange(SIZE, dtype=torch.float32).view(1, SIZE, 1)
    cols = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE)
    shift = phase.view(-1, 1, 1).float()
    wave = 2 * math.pi / PERIOD
    horizontal = torch.sin(wave * (rows + shift)).expand(-1, SIZE, SIZE)
    vertical = torch.sin(wave * (cols + shift)).expand(-1, SIZE, SIZE)
    diagonal = torch.sin(wave * (rows + cols + shift) / math.sqrt(2))
    checker = torch.sin(wave * (rows + shift)) * torch.sin(wave * (cols + shift))
    return torch.stack([horizontal, vertical, diagonal, checker], dim=1)


def make_images(samples: int, seed: int, noise: float = 2.0) -> TensorDataset:
    """``samples`` images ``(1, 16, 16)`` with labels 0-3, balanced, the same for a seed."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(samples) % len(CLASSES)
    labels = labels[torch.randperm(samples, generator=generator)]
    phase = torch.randint(0, PERIOD, (samples,), generator=generator)
    clean = patterns(phase)[torch.arange(samples), labels]
    images = clean + noise * torch.randn(samples, SIZE, SIZE, generator=generator)
    return TensorDataset(images.unsqueeze(1), labels)


# --- model -----------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head: ``(batch, 1, 16, 16)`` to ``(batch, classes)``."""

    def __init__(self, classes: int = len(CLASSES), width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).flatten(1))


class ImageClassifier(TrainModule):
    """Trains ``SmallCNN``; logs ``train_loss``, ``train_acc``, ``val_loss`` and ``val_acc``."""

    def __init__(self, classes: int = len(CLASSES), width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallCNN(classes, width)
        # Metrics are submodules: they move with the module and sync over processes.
        self.train_acc = MulticlassAccuracy(num_classes=classes)
        self.val_acc = MulticlassAccuracy(num_classes=classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        # sync_dist: on several processes, the mean over every process's batches.
        self.log("val_loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.val_acc(logits, labels)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


# --- callbacks for the story the script prints ------------------------------------------------


class PrintProgress(Callback):
    """Prints where fit starts and one line per validation during fit (rank 0 only)."""

    def __init__(self) -> None:
        self.fitting = False

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self.fitting = True
        if trainer.is_global_zero:
            print(f"fit starts at step {trainer.global_step}")

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self.fitting and not trainer.sanity_checking and trainer.is_global_zero:
            metrics = trainer.callback_metrics
            print(
                f"epoch {trainer.current_epoch}: val_loss {metrics['val_loss']:.4f}, "
                f"val_acc {metrics['val_acc']:.4f}"
            )

    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        self.fitting = False


class SigtermAfterStep(Callback):
    """Sends SIGTERM to this process after optimizer step ``step`` (rank 0 only), as a
    cluster's scheduler would when it preempts the job."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)


# --- the script ------------------------------------------------------------------------------


def build_trainer(args: argparse.Namespace, max_epochs: int) -> tuple[Trainer, ModelCheckpoint]:
    checkpoints = ModelCheckpoint(
        filename="{epoch}-{val_acc:.4f}", monitor="val_acc", mode="max", save_top_k=3,
        save_last=True,
    )  # fmt: skip
    callbacks: list[Callback] = [
        PrintProgress(),
        checkpoints,
        EarlyStopping(monitor="val_loss", patience=args.patience, min_delta=1e-3),
    ]
    if args.sigterm_after_step is not None:
        callbacks.append(SigtermAfterStep(args.sigterm_after_step))
    trainer = Trainer(
        max_epochs=max_epochs,
        accelerator=args.accelerator,
        strategy=args.strategy,
        callbacks=callbacks,
        default_root_dir=args.root,
        log_every_n_steps=10,
        enable_progress_bar=False,
        seed=args.seed,
    )
    return trainer, checkpoints


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="max_epochs of the first run")
    parser.add_argument(
        "--more-epochs", type=int, default=25, help="epochs the resumed run adds; 0: no second run"
    )
    parser.add_argument("--samples", type=int, default=4096, help="training images")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--noise", type=float, default=2.0, help="std of the pixel noise")
    parser.add_argument("--patience", type=int, default=3, help="EarlyStopping's patience")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--accelerator", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--strategy", default="auto", help="auto, ddp or fsdp")
    parser.add_argument("--root", default="runs/image_classifier", help="default_root_dir")
    parser.add_argument("--ckpt-path", default=None, help="resume the first run from this")
    parser.add_argument(
        "--sigterm-after-step", type=int, default=None, help="send SIGTERM to itself after it"
    )
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    train_set = make_images(args.samples, seed=args.seed, noise=args.noise)
    val_set = make_images(max(256, args.samples // 4), seed=args.seed + 1, noise=args.noise)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)

    trainer, checkpoints = build_trainer(args, args.epochs)
    module = ImageClassifier(lr=args.lr)
    trainer.fit(module, train_loader, val_loader, ckpt_path=args.ckpt_path)
    if trainer.is_global_zero:
        print(f"first run: {trainer.current_epoch} epochs, {trainer.global_step} steps")

    max_epochs = args.epochs
    if args.more_epochs > 0:
        # A new process would do the same: a new Trainer, a new (untrained) module, and
        # ckpt_path="last" to continue where the first run stopped.
        max_epochs = args.epochs + args.more_epochs
        trainer, checkpoints = build_trainer(args, max_epochs)
        module = ImageClassifier(lr=args.lr)
        trainer.fit(module, train_loader, val_loader, ckpt_path="last")
        if trainer.is_global_zero:
            print(f"resumed run: {trainer.current_epoch} epochs, {trainer.global_step} steps")

    final_acc = trainer.callback_metrics["val_acc"]  # the fit's last validation
    weights = trainer.save_checkpoint(Path(args.root) / "final", weights_only=True)
    if trainer.is_global_zero:
        stopped = trainer.current_epoch < max_epochs
        print("stopped early by EarlyStopping" if stopped else "reached max_epochs")
        print("top-3 checkpoints by val_acc:")
        for path, value in sorted(checkpoints.best_k_models.items(), key=lambda kv: -kv[1]):
            print(f"  {value:.4f}  {path}")
        print(f"last: {checkpoints.last_model_path}")
        print(f"final validation accuracy: {final_acc:.4f} (guessing: 0.25)")
        print(f"final weights: {weights / 'model.safetensors'}")
        print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
