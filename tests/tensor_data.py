from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset


class TensorData(LightningDataModule):
    """The same images for training, validation and test (tests only)."""

    def __init__(self, x, y, batch_size: int = 32):
        super().__init__()
        self.train_set = self.val_set = self.test_set = TensorDataset(x, y)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.batch_size)
