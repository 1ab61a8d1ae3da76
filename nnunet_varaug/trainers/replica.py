"""``<Base>_seed<K>``: a seed replica, every random number generator of training derived from K."""
from __future__ import annotations

from nnunet_varaug.seeding import derive_seed, make_deterministic, seed_everything, seeded_augmenters
from nnunet_varaug.trainers.common import RecordSettingsMixin


class SeedReplicaMixin(RecordSettingsMixin):
    """Seeds python, numpy, torch and CUDA from ``replica_seed`` before the network is built, and gives the
    augmentation workers seeds derived from it (order-deterministic). Arithmetic stays plain IEEE; cuDNN is
    asked for deterministic kernels so that a replica is reproducible on the GPU too."""

    replica_seed: int = 0

    @staticmethod
    def class_attributes(settings: dict) -> dict:
        return {"replica_seed": settings["seed"]}

    def initialize(self):
        seed_everything(derive_seed(self.replica_seed, "network"))
        super().initialize()

    def on_train_start(self):
        make_deterministic()
        # Seeded per start epoch: a fresh run and a run resumed at epoch e are each reproducible.
        seed_everything(derive_seed(self.replica_seed, "train", self.current_epoch))
        super().on_train_start()

    def get_dataloaders(self):
        with seeded_augmenters(derive_seed(self.replica_seed, "augmentation", self.current_epoch)):
            return super().get_dataloaders()
