import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from ember import DataModule, TrainModule, Trainer, seed_everything
from ember.callbacks import EarlyStopping, ModelCheckpoint
from ember.loggers import CSVLogger


class Blobs(DataModule):
    """Four Gaussian blobs in 16 dimensions, one class each."""

    def __init__(self, batch_size: int = 32):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage):
        generator = torch.Generator().manual_seed(0)
        centers = 1.5 * torch.randn(4, 16, generator=generator)
        labels = torch.randint(0, 4, (600,), generator=generator)
        points = centers[labels] + torch.randn(600, 16, generator=generator)
        data = TensorDataset(points, labels)
        self.train_set, self.val_set, self.test_set = random_split(
            data, [400, 100, 100], generator=generator
        )

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.hparams.batch_size)


class Classifier(TrainModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def evaluate(self, batch, stage):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log(f"{stage}_acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


if __name__ == "__main__":
    seed_everything(0)
    trainer = Trainer(
        max_epochs=5,
        accelerator="cpu",
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        callbacks=[
            ModelCheckpoint(monitor="val_acc", mode="max", save_last=True),
            EarlyStopping(monitor="val_loss", patience=3),
        ],
        logger=CSVLogger("runs", name="blobs"),
        default_root_dir="runs/blobs",
    )
    trainer.fit(Classifier(), datamodule=Blobs())
    results = trainer.test(ckpt_path="best", datamodule=Blobs())
    best = Classifier.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    print(f"test accuracy {results[0]['test_acc']:.3f}, best model has {best.hparams.hidden} units")
