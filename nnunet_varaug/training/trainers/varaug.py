"""``<Base>_varaug[_p<NN>]`` and ``nnUNetTrainerVarAug``: nnU-Net training with variability samples.

Per training sample the target is the ground truth with probability 1 - p, else the map of one replica chosen
uniformly, cropped and augmented exactly like the image. Two equivalent data flows (``varaug_select_at_load``):

* ``False`` (the flow first designed): the training dataset (``VariabilitySampleDataset``) returns the ground truth
  plus the K replica maps as extra segmentation channels, read lazily; nnU-Net's data loader crops all channels
  with one box, its spatial transform and mirroring move them together, and ``VariabilitySampleTransform(p, K)``,
  inserted right after nnU-Net's label-removal step (``RemoveLabelTransform(-1, 0)``) and before region conversion
  and deep-supervision downsampling, keeps one channel;
* ``True`` (default): the same ``VariabilitySampleTransform`` draws the choice when the case is loaded and the
  dataset returns only the chosen map, so only that map is read and augmented. nnU-Net's augmentation transforms
  every segmentation channel independently with the same parameters, so the target of a given choice is the same
  voxel for voxel (tests/training/trainers/test_varaug.py checks both flows against stock nnU-Net); carrying K = 10 extra channels
  through augmentation costs ~8x the pipeline time, choosing first costs nothing measurable
  (benchmarks/bench_augmentation.py).

Validation (the pseudo-Dice during training and the final validation) uses the ground truth only. K comes from
the sample set's manifest, which must match the trainer's plans, configuration, fold, training cases and the
preprocessed segmentations the maps were made from (their sha256s); p and the set's fingerprint (sha256 of the
manifest) are recorded in debug.json and every checkpoint, and a resumed run whose set changed says so in its log.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_varaug.utilities import paths
from nnunet_varaug.utilities.errors import VarAugError, require_single_stage
from nnunet_varaug.training.trainers.common import RecordSettingsMixin


def insert_variability_transform(compose, transform):
    """Insert ``transform`` into nnU-Net's training ``ComposeTransforms`` right after ``RemoveLabelTransform(-1, 0)``.

    Raises:
        VarAugError: the pipeline has no such step, or converts the segmentation (regions, one-hot, deep
            supervision) before it; the transform must see the raw 1 + K label channels.
    """
    from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

    steps = list(compose.transforms)
    position = next((i for i, t in enumerate(steps) if isinstance(t, RemoveLabelTransform)
                     and t.label_value == -1), None)
    if position is None:
        raise VarAugError("the base trainer's training transforms have no RemoveLabelTransform(-1, 0) step, after "
                          "which variability samples are chosen; build the _varaug trainer on a base trainer that "
                          "keeps nnU-Net's default pipeline order")
    converting = (ConvertSegmentationToRegionsTransform, DownsampleSegForDSTransform, MoveSegAsOneHotToDataTransform)
    early = [type(t).__name__ for t in steps[:position] if isinstance(t, converting)]
    if early:
        raise VarAugError(f"the base trainer converts the segmentation ({', '.join(early)}) before "
                          f"RemoveLabelTransform(-1, 0); variability samples need the label channels unconverted there")
    steps.insert(position + 1, transform)
    compose.transforms = steps
    return compose


class VarAugMixin(RecordSettingsMixin):
    """Train ``<Base>`` with its targets swapped, with probability ``varaug_p``, for a replica's label map."""

    varaug_p: float = 0.5
    varaug_source: str = "in-fold"  # or "out-of-fold" (``_oof``): which sample set the maps come from
    varaug_select_at_load: bool = True
    varaug_num_samples: Optional[int] = None
    varaug_fingerprint: Optional[str] = None
    varaug_samples_folder: Optional[str] = None
    varaug_command: str = ""
    _varaug_checkpoint_fingerprint: Optional[str] = None

    @staticmethod
    def class_attributes(settings: dict) -> dict:
        return {"varaug_p": float(settings["p"]), "varaug_source": settings.get("source", "in-fold")}

    # ---- where the samples are and how to make them ----------------------------------------------------------
    def varaug_folder(self) -> str:
        if self.varaug_source == "out-of-fold":
            from nnunet_varaug.training.outoffold import out_of_fold_folder

            return out_of_fold_folder(self.preprocessed_dataset_folder_base, self.plans_manager.plans_name,
                                      self.configuration_name)
        return paths.samples_folder_for(self.preprocessed_dataset_folder_base, self.plans_manager.plans_name,
                                        self.configuration_name, self.fold)

    def varaug_fix_command(self, manifest: Optional[dict] = None) -> str:
        """The exact ``nnunet_varaug samples`` command that builds this trainer's sample set.

        Taken from the manifest if there is one; otherwise for the seed replicas of this trainer's base that are
        already trained (or, with none trained, the replicas command followed by samples for ten of them).
        """
        from nnunet_varaug.utilities.names import replica_name

        dataset = self.plans_manager.dataset_name
        dataset_id = paths.dataset_id_of(dataset)
        plans, config = self.plans_manager.plans_name, self.configuration_name
        if manifest is not None and manifest.get("num_replicas"):
            return paths.samples_command(dataset_id, config, self.fold, manifest["num_replicas"],
                                         manifest.get("base", "nnUNetTrainer"), manifest.get("kind", "seed"), plans,
                                         manifest.get("start", 0))
        base = getattr(type(self), "varaug_base_name", None) or "nnUNetTrainer"
        results = os.environ.get("nnUNet_results")

        def finished(k: int) -> bool:
            model = paths.model_folder_for(results, dataset, replica_name(base, "seed", k), plans, config)
            return os.path.isfile(paths.final_checkpoint_in(paths.fold_folder_for(model, self.fold)))

        k = 0
        while results and finished(k):
            k += 1
        command = paths.samples_command(dataset_id, config, self.fold, k or 10, base, "seed", plans)
        if k == 0:
            flags = paths.experiment_flags(dataset_id, config, self.fold, 10, base, "seed", plans)
            return f"nnunet_varaug replicas {flags}` and then `{command}"
        return command

    # ---- checks before training ---------------------------------------------------------------------------------
    def varaug_prepare(self) -> dict:
        """Refuse cascades and sample sets that do not fit; set K and the fingerprint. Returns the manifest."""
        from nnunet_varaug.training.sampleset import read_manifest, validate_sample_set

        require_single_stage(self.configuration_name, self.configuration_manager.previous_stage_name,
                             type(self).__name__)
        if not 0.0 <= float(self.varaug_p) <= 1.0:
            raise VarAugError(f"{type(self).__name__}: p = {self.varaug_p} is outside [0, 1]")
        if self.varaug_source == "out-of-fold":
            return self._varaug_use(self.varaug_folder(), self._varaug_prepare_out_of_fold())
        folder = self.varaug_folder()
        try:
            manifest = read_manifest(folder)
        except VarAugError as e:
            raise VarAugError(f"{e}: rebuild it with `{self.varaug_fix_command()} --force`") from None
        fix = self.varaug_fix_command(manifest)
        tr_keys, _ = self.do_split()
        shapes = self._varaug_training_shapes(tr_keys) if manifest is not None else {}
        manifest = validate_sample_set(folder, plans=self.plans_manager.plans_name,
                                       configuration=self.configuration_name, fold=self.fold, cases=list(tr_keys),
                                       shapes=shapes, fix=fix, preprocessed_folder=self.preprocessed_dataset_folder)
        self.varaug_command = fix
        return self._varaug_use(folder, manifest)

    def _varaug_training_shapes(self, tr_keys) -> Dict[str, tuple]:
        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        dataset = self.dataset_class(self.preprocessed_dataset_folder, list(tr_keys))
        return {case: tuple(int(s) for s in dataset.load_case(case)[1].shape[1:]) for case in tr_keys}

    def _varaug_prepare_out_of_fold(self) -> dict:
        """Check the out-of-fold set against this fold's training cases and the current splits_final.json."""
        from nnunet_varaug.utilities import folds
        from nnunet_varaug.training import outoffold
        from nnunet_varaug.training.sampleset import read_manifest

        folder = self.varaug_folder()
        splits_file = os.path.join(self.preprocessed_dataset_folder_base, folds.SPLITS_FILE)
        tr_keys, _ = self.do_split()  # writes splits_final.json if nnU-Net has not yet
        splits = folds.read_splits(splits_file)
        try:
            manifest = read_manifest(folder)
        except VarAugError:
            manifest = None
        fix = outoffold.trainer_fix_command(self.plans_manager.dataset_name, self.plans_manager.plans_name,
                                            self.configuration_name,
                                            getattr(type(self), "varaug_base_name", None) or "nnUNetTrainer",
                                            len(splits), manifest)
        shapes = self._varaug_training_shapes(tr_keys) if manifest is not None else {}
        manifest = outoffold.validate_out_of_fold_set(folder, plans=self.plans_manager.plans_name,
                                                      configuration=self.configuration_name, fold=int(self.fold),
                                                      cases=list(tr_keys), splits=splits, shapes=shapes, fix=fix,
                                                      preprocessed_folder=self.preprocessed_dataset_folder)
        self.varaug_command = outoffold.trainer_fix_command(
            self.plans_manager.dataset_name, self.plans_manager.plans_name, self.configuration_name,
            manifest.get("base", "nnUNetTrainer"), len(splits), manifest, bare=True)
        return manifest

    def _varaug_use(self, folder: str, manifest: dict) -> dict:
        """Take ``manifest``'s checked set: K, fingerprint, a log line."""
        from nnunet_varaug.training.sampleset import manifest_fingerprint

        self.varaug_samples_folder = folder
        self.varaug_num_samples = int(manifest["num_replicas"])
        self.varaug_fingerprint = manifest_fingerprint(folder)
        self.print_to_log_file(f"variability samples ({self.varaug_source}): p = {self.varaug_p}, "
                               f"K = {self.varaug_num_samples} replica maps per case from {folder} "
                               f"(sha256 of manifest {self.varaug_fingerprint[:12]}…)")
        if self._varaug_checkpoint_fingerprint not in (None, self.varaug_fingerprint):
            self.print_to_log_file("WARNING: the sample set changed since the checkpoint this run continues from "
                                   f"(manifest sha256 {self._varaug_checkpoint_fingerprint[:12]}… -> "
                                   f"{self.varaug_fingerprint[:12]}…)")
        return manifest

    # ---- nnU-Net hooks -------------------------------------------------------------------------------------------
    def initialize(self):
        if self.is_cascaded:
            self.varaug_prepare()  # raises the cascade error before anything is built
        super().initialize()

    def get_dataloaders(self):
        self.varaug_prepare()
        return super().get_dataloaders()

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's (or the base trainer's) training pipeline with ``VariabilitySampleTransform`` inserted."""
        from nnunet_varaug.training.transforms import VariabilitySampleTransform

        if self.varaug_num_samples is None:
            self.varaug_prepare()
        compose = super().get_training_transforms(*args, **kwargs)
        if self.varaug_select_at_load:  # the dataset already chose the map
            return compose
        return insert_variability_transform(compose, VariabilitySampleTransform(self.varaug_p,
                                                                                self.varaug_num_samples))

    def get_tr_and_val_datasets(self):
        from nnunet_varaug.training.sampleset import VariabilitySampleDataset

        from nnunet_varaug.training.transforms import VariabilitySampleTransform

        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.varaug_num_samples is None:
            self.varaug_prepare()
        chooser = VariabilitySampleTransform(self.varaug_p, self.varaug_num_samples) \
            if self.varaug_select_at_load else None
        return (VariabilitySampleDataset(dataset_tr, self.varaug_samples_folder, self.varaug_num_samples,
                                         self.varaug_command, chooser), dataset_val)

    def load_checkpoint(self, filename_or_checkpoint):
        """nnU-Net's ``load_checkpoint``, remembering which sample set the checkpoint was trained with."""
        from nnunet_varaug.training.trainers.common import SETTINGS_KEY

        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        record = (checkpoint.get(SETTINGS_KEY) or {}).get("sample_set") or {}
        self._varaug_checkpoint_fingerprint = record.get("fingerprint")
        # passed on as given: nnU-Net 2.8's load_checkpoint reads a file name, and fails on a loaded dict
        return super().load_checkpoint(filename_or_checkpoint)

    def varaug_record(self) -> Dict[str, Any]:
        record = super().varaug_record()
        record["sample_set"] = {"p": float(self.varaug_p), "source": self.varaug_source,
                                "num_samples": self.varaug_num_samples,
                                "fingerprint": self.varaug_fingerprint, "folder": self.varaug_samples_folder,
                                "select_at_load": bool(self.varaug_select_at_load)}
        return record


class nnUNetTrainerVarAug(VarAugMixin, nnUNetTrainer):
    """nnU-Net's default trainer with variability samples at p = 0.5: the same as ``nnUNetTrainer_varaug``."""

    varaug_p = 0.5
    varaug_settings = {"varaug": {"p": 0.5}}
    varaug_base_name = "nnUNetTrainer"
