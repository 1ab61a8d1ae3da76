"""One replica experiment: dataset, configuration, fold, plans, base trainer, kind and K — checked once.

Every command (``replicas``, ``samples``, ``analyze``, ``benchmark``) starts by building an ``Experiment`` from
its ``-d -c -f -p -tr -n`` flags (declared once, in :mod:`nnunet_varaug.commands.flags`). The checks run before anything
is written, and each error names the command that fixes it. Names and paths come from :mod:`nnunet_varaug.utilities.paths`;
this is command-layer code, never imported by the trainers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

from nnunet_varaug.utilities import paths
from nnunet_varaug.utilities import folds, names
from nnunet_varaug.training import registry
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.paths import dataset_id_of, dataset_name, parse_fold, require_env, samples_folder_for


@dataclass
class Experiment:
    """The replicas ``<base>_<kind><start> … <base>_<kind><start+n-1>`` of one nnU-Net configuration and fold."""

    dataset: str
    configuration: str
    fold: Union[int, str]
    num_replicas: int
    base: str = "nnUNetTrainer"
    kind: str = "seed"
    plans: str = "nnUNetPlans"
    start: int = 0
    _split: Optional[Tuple[List[str], List[str]]] = field(default=None, repr=False)

    @classmethod
    def from_args(cls, dataset, configuration: str, fold, num_replicas: int, base: str = "nnUNetTrainer",
                  kind: str = "seed", plans: str = "nnUNetPlans", start: int = 0,
                  need_results: bool = True) -> "Experiment":
        """Validate everything that can be validated before work starts."""
        if need_results:
            require_env("nnUNet_results", "nnU-Net needs it to store trained models")
        require_env("nnUNet_preprocessed", "nnU-Net needs it to find plans and preprocessed data")
        if num_replicas is None or int(num_replicas) < 1:
            raise VarAugError(f"-n must be at least 1 (the number of replicas), got {num_replicas}")
        if int(start) < 0:
            raise VarAugError(f"--start must be >= 0, got {start}")
        if kind not in ("seed", "mca"):
            raise VarAugError(f"--kind must be 'seed' or 'mca', got '{kind}'")
        exp = cls(dataset_name(dataset), configuration, parse_fold(fold), int(num_replicas), base, kind, plans,
                  int(start))
        plans_file = exp.plans_file
        if not os.path.isfile(plans_file):
            raise VarAugError(f"no plans '{plans}' for {exp.dataset} ({plans_file} is missing): run "
                              f"`nnUNetv2_plan_and_preprocess -d {exp.dataset_id}` first")
        configurations = exp.plans_json["configurations"]
        if configuration not in configurations:
            raise VarAugError(f"configuration '{configuration}' is not in {plans_file}; it has: "
                              f"{', '.join(sorted(configurations))}")
        exp.split()  # checks the fold
        try:  # last: finding a trainer imports all of nnU-Net's trainer modules
            registry.resolve(base)
            for name in exp.replica_names:
                names.parse(name)
        except names.TrainerNameError as e:
            raise VarAugError(f"unknown base trainer '{base}': {e}") from None
        return exp

    # ---- names and folders ------------------------------------------------------------------------------------
    @property
    def dataset_id(self) -> int:
        return dataset_id_of(self.dataset)

    @property
    def replica_names(self) -> List[str]:
        return [names.replica_name(self.base, self.kind, k) for k in range(self.start, self.start + self.num_replicas)]

    @property
    def preprocessed_base(self) -> str:
        return os.path.join(os.environ["nnUNet_preprocessed"], self.dataset)

    @property
    def plans_file(self) -> str:
        return os.path.join(self.preprocessed_base, f"{self.plans}.json")

    @property
    def plans_json(self) -> dict:
        with open(self.plans_file) as f:
            return json.load(f)

    @property
    def dataset_json(self) -> dict:
        with open(os.path.join(self.preprocessed_base, "dataset.json")) as f:
            return json.load(f)

    @property
    def data_identifier(self) -> str:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans_json).get_configuration(self.configuration).data_identifier

    @property
    def preprocessed_folder(self) -> str:
        return os.path.join(self.preprocessed_base, self.data_identifier)

    def model_folder(self, trainer: str) -> str:
        return paths.model_folder_for(os.environ["nnUNet_results"], self.dataset, trainer, self.plans,
                                      self.configuration)

    def fold_folder(self, trainer: str) -> str:
        return paths.fold_folder_for(self.model_folder(trainer), self.fold)

    def final_checkpoint(self, trainer: str) -> str:
        return paths.final_checkpoint_in(self.fold_folder(trainer))

    def latest_checkpoint(self, trainer: str) -> str:
        return paths.latest_checkpoint_in(self.fold_folder(trainer))

    @property
    def samples_folder(self) -> str:
        return samples_folder_for(self.preprocessed_base, self.plans, self.configuration, self.fold)

    @property
    def flags(self) -> str:
        """The flags that name this experiment on the command line, for messages."""
        return paths.experiment_flags(self.dataset_id, self.configuration, self.fold, self.num_replicas, self.base,
                                      self.kind, self.plans, self.start)

    # ---- split ------------------------------------------------------------------------------------------------
    def split(self) -> Tuple[List[str], List[str]]:
        """(training cases, validation cases) of the fold, exactly as nnU-Net's ``do_split`` makes them."""
        if self._split is not None:
            return self._split
        folder = self.preprocessed_folder
        if not os.path.isdir(folder):
            raise VarAugError(f"no preprocessed data for {self.dataset} {self.configuration} ({folder} is missing): "
                              f"run `nnUNetv2_plan_and_preprocess -d {self.dataset_id} -c {self.configuration}`")
        keys = self._identifiers()
        if self.fold == "all":
            self._split = (keys, keys)
            return self._split
        splits_file = self.splits_file
        if os.path.isfile(splits_file):
            with open(splits_file) as f:
                splits = json.load(f)
        else:
            splits = self._default_splits(keys)
        if self.fold >= len(splits):
            raise VarAugError(f"fold {self.fold} does not exist for {self.dataset}: the splits "
                              f"({splits_file if os.path.isfile(splits_file) else 'nnU-Net default'}) have "
                              f"{len(splits)} folds (0..{len(splits) - 1}); use one of them or -f all")
        self._split = (list(splits[self.fold]["train"]), list(splits[self.fold]["val"]))
        return self._split

    @property
    def splits_file(self) -> str:
        return os.path.join(self.preprocessed_base, "splits_final.json")

    def write_default_splits(self) -> bool:
        """Write the ``splits_final.json`` that nnU-Net's first training would write (its 5-fold split of the sorted
        cases, seed 12345), atomically, where there is none, before replicas start side by side (``--devices``,
        SLURM arrays): nnU-Net's ``do_split`` writes the missing file in place, and a second training that reads
        it half-written fails (JSONDecodeError). An existing file is kept. Returns whether it wrote one."""
        if self.fold == "all" or os.path.isfile(self.splits_file) or not os.path.isdir(self.preprocessed_folder):
            return False
        splits = self._default_splits(self._identifiers())
        if not splits:
            return False
        folds.write_splits(self.splits_file, splits)
        return True

    def _identifiers(self) -> List[str]:
        """The sorted case identifiers of the preprocessed folder."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        folder = self.preprocessed_folder
        return sorted(infer_dataset_class(folder).get_identifiers(folder))

    @staticmethod
    def _default_splits(keys: List[str]) -> list:
        """What nnU-Net writes on its first training: 5 folds of the sorted cases, seed 12345 (none below 5 cases)."""
        return folds.crossval_splits(keys, 5, 12345) if len(keys) >= 5 else []

    # ---- replica states ---------------------------------------------------------------------------------------
    def replica_state(self, trainer: str) -> str:
        """'finished' (checkpoint_final.pth), 'interrupted' (checkpoint_latest.pth only) or 'missing'."""
        if os.path.isfile(self.final_checkpoint(trainer)):
            return "finished"
        if os.path.isfile(self.latest_checkpoint(trainer)):
            return "interrupted"
        return "missing"

    def require_finished(self) -> List[str]:
        """The replica names, or an error naming the unfinished ones and the command that trains them."""
        missing = [n for n in self.replica_names if self.replica_state(n) != "finished"]
        if missing:
            raise VarAugError(f"{len(missing)} of {self.num_replicas} replicas are not trained for {self.dataset} "
                              f"{self.configuration} fold {self.fold}: {', '.join(missing)}. Run "
                              f"`nnunet_varaug replicas {self.flags}`")
        return self.replica_names
