"""``<Base>_varaug`` trainers: targets are aligned with the image, voxel for voxel, through nnU-Net's real pipeline.

The alignment test builds sample sets whose replica maps are known functions of the ground truth (labels 1 and 2
swapped; the lesion merged into the organ), runs the real training data loader and transforms of a ``_varaug``
trainer, and compares every target with *independent* reference runs: nnU-Net's stock trainer on copies of the
preprocessed folder whose segmentation files hold the ground truth or one known replica map. All runs start from
the same seed; the reference pipelines contain a step that draws exactly what ``VariabilitySampleTransform`` draws
(and records the channel it would pick), so all runs consume one random stream: same patches, same rotations,
same mirroring. A target must then equal the reference target of the recorded channel, at every
deep-supervision scale, and the images must be identical.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY, plan_and_preprocess, run_cli, trainer_in_process

REGION_IGNORE_ID = 133  # regions + ignore label, (16, 32, 32): the 2d and 3d data-loader tests


# ---- helpers ------------------------------------------------------------------------------------------------------
def swap_1_2(gt: np.ndarray) -> np.ndarray:
    out = gt.copy()
    out[gt == 1], out[gt == 2] = 2, 1
    return out


def merge_lesion(gt: np.ndarray) -> np.ndarray:
    out = gt.copy()
    out[gt == 2] = 1
    return out


KNOWN = (swap_1_2, merge_lesion)


def write_known_sample_set(dataset: str, configuration: str, fold: int, functions=KNOWN) -> dict:
    """A sample set whose replica k is ``functions[k](GT)`` for every training case of the fold."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_varaug.training.experiment import Experiment
    from nnunet_varaug.training.sampleset import write_sample_set

    exp = Experiment.from_args(dataset, configuration, fold, 1, need_results=False)
    pm = PlansManager(exp.plans_json)
    lm = pm.get_label_manager(exp.dataset_json)
    cases = exp.split()[0]
    ds = nnUNetDatasetBlosc2(exp.preprocessed_folder, list(cases))
    maps = {}
    for case in cases:
        gt = np.asarray(ds.load_case(case)[1][:])[0]
        maps[case] = np.stack([f(gt) for f in functions]).astype(np.int8)
    return write_sample_set(exp.samples_folder, maps, dataset=exp.dataset, plans=exp.plans,
                            configuration=configuration, fold=fold, replica_names=[f.__name__ for f in functions],
                            patch_size=pm.get_configuration(configuration).patch_size,
                            ignore_label=lm.ignore_label, regions=lm.has_regions)


def reference_folder(dataset: str, configuration: str, function) -> str:
    """A copy of the preprocessed folder whose ``_seg.b2nd`` files hold ``function(GT)`` (images, properties
    and class locations untouched)."""
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_varaug.training.experiment import Experiment

    src = Experiment.from_args(dataset, configuration, "all", 1, need_results=False).preprocessed_folder
    dst = f"{src}__ref_{function.__name__}"
    if os.path.isdir(dst):
        return dst
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ds = nnUNetDatasetBlosc2(src)
    for case in ds.identifiers:
        for suffix in (".b2nd", ".pkl"):
            os.symlink(os.path.join(src, case + suffix), os.path.join(tmp, case + suffix))
        seg = np.asarray(ds.load_case(case)[1][:])
        blosc2.asarray(np.ascontiguousarray(function(seg)), urlpath=os.path.join(tmp, case + "_seg.b2nd"))
    os.replace(tmp, dst)
    return dst


class DrawLikeVarAug:
    """Stands where the _varaug trainer draws its choice (a pipeline step after RemoveLabelTransform, or the
    training dataset's load_case): draws what VariabilitySampleTransform draws, records the channel it would
    pick, changes nothing."""

    def __init__(self, p: float, k: int, record: list, dataset=None):
        from nnunet_varaug.training.transforms import VariabilitySampleTransform

        self.twin = VariabilitySampleTransform(p, k)
        self.record = record
        self.dataset = dataset
        if dataset is not None:
            self.identifiers = dataset.identifiers

    def __call__(self, **data_dict):
        self.record.append(self.twin.get_parameters(**data_dict)["channel"])
        return data_dict

    def load_case(self, identifier):
        self.record.append(self.twin.get_parameters()["channel"])
        return self.dataset.load_case(identifier)


def reference_trainer(folder: str, p: float, k: int, record: list, select_at_load: bool):
    """nnU-Net's stock trainer reading ``folder``, drawing (only) where the _varaug trainer draws."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_varaug.training.trainers.varaug import insert_variability_transform

    class Reference(nnUNetTrainer):
        def get_training_transforms(self, *args, **kwargs):
            compose = nnUNetTrainer.get_training_transforms(*args, **kwargs)
            return compose if select_at_load else insert_variability_transform(compose, DrawLikeVarAug(p, k, record))

        def get_tr_and_val_datasets(self):
            self.preprocessed_dataset_folder = folder
            train, val = super().get_tr_and_val_datasets()
            return (DrawLikeVarAug(p, k, record, train) if select_at_load else train), val

    return Reference


def run_loader(trainer_cls, dataset: str, configuration: str, fold: int, num_batches: int, seed: int = 7):
    """The trainer's own training batches (nnU-Net's data loader + transforms, single process)."""
    from nnunet_varaug.training.seeding import seed_everything, untimed_gaussian_blur

    trainer = trainer_in_process(trainer_cls, dataset, fold, configuration)
    trainer.initialize()
    seed_everything(seed)
    with untimed_gaussian_blur():  # batchgeneratorsv2's timed direct/FFT choice would differ between trainers
        dl_train, dl_val = trainer.get_dataloaders()
    batches = [next(dl_train) for _ in range(num_batches)]
    return trainer, dl_train, dl_val, batches


def as_list(target):
    return target if isinstance(target, list) else [target]


def check_alignment(dataset: str, configuration: str, fold: int, trainer_name: str, p: float, num_batches: int,
                    select_at_load: bool = True):
    """Every target of the _varaug trainer equals the stock pipeline's target on GT or on the drawn replica map."""
    from nnunet_varaug.training.registry import resolve
    from nnunet_varaug.training.sampleset import VariabilitySampleDataset

    manifest = write_known_sample_set(dataset, configuration, fold)
    k = manifest["num_replicas"]
    cls = resolve(trainer_name)
    if cls.varaug_select_at_load != select_at_load:
        cls = type(trainer_name, (cls,), {"varaug_select_at_load": select_at_load})
    trainer, dl_train, dl_val, batches = run_loader(cls, dataset, configuration, fold, num_batches)
    assert isinstance(dl_train.data_loader._data, VariabilitySampleDataset)
    assert (dl_train.data_loader._data.chooser is not None) == select_at_load
    assert ("VariabilitySampleTransform" in repr(dl_train.data_loader.transforms)) != select_at_load
    assert not isinstance(dl_val.data_loader._data, VariabilitySampleDataset)  # validation: ground truth only
    src = trainer.preprocessed_dataset_folder
    references, records = [], []
    for function in (None, *KNOWN):
        folder = src if function is None else reference_folder(dataset, configuration, function)
        record = []
        references.append(run_loader(reference_trainer(folder, p, k, record, select_at_load), dataset,
                                     configuration, fold, num_batches)[3])
        records.append(record)
    assert all(r == records[0] for r in records)  # one random stream
    per_batch = len(batches[0]["keys"])
    # the first training batch is drawn inside get_dataloaders, then the first validation batch (no draws)
    channels = records[0][per_batch:]
    assert len(channels) == num_batches * per_batch
    replaced = informative = 0
    for b, batch in enumerate(batches):
        assert list(batch["keys"]) == list(references[0][b]["keys"])
        for ref in references:
            assert torch.equal(batch["data"], ref[b]["data"])  # same patches, same augmentation
        for j in range(per_batch):
            c = channels[b * per_batch + j]
            replaced += c != 0
            for scale, (got, want) in enumerate(zip(as_list(batch["target"]), as_list(references[c][b]["target"]))):
                assert torch.equal(got[j], want[j]), f"batch {b} sample {j} scale {scale}: not channel {c}'s target"
            # a replica's target that differs from the ground truth's: here the comparison above tells a
            # trainer that uses the drawn replica map from one that keeps the ground truth
            informative += c != 0 and not torch.equal(as_list(references[c][b]["target"])[0][j],
                                                      as_list(references[0][b]["target"])[0][j])
    n = num_batches * per_batch
    share = replaced / n
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(share - p) <= 4 * sigma + 1e-9, (share, p, n)
    if 0 < p < 1:
        assert {c for c in channels if c} == set(range(1, k + 1))  # every replica is used
    # most replaced targets must differ from the ground truth's, or the comparisons above cannot fail
    assert informative >= replaced / 2 > 0, (informative, replaced)
    return trainer, batches, channels


# ---- tests ----------------------------------------------------------------------------------------------------------
@pytest.mark.nnunet
@pytest.mark.parametrize("select_at_load", [True, False], ids=["select_at_load", "all_channels"])
def test_alignment_3d_fullres(synthetic_3d, select_at_load):
    trainer, batches, channels = check_alignment(synthetic_3d["name"], "3d_fullres", 1, "nnUNetTrainer_varaug",
                                                 0.5, num_batches=25, select_at_load=select_at_load)
    assert trainer.varaug_num_samples == 2
    record = trainer.varaug_record()["sample_set"]
    assert record["p"] == 0.5 and len(record["fingerprint"]) == 64


@pytest.fixture(scope="session")
def region_ignore_dataset(nnunet_env):
    from nnunet_varaug.experiments.datasets import make_synthetic_dataset

    folder = make_synthetic_dataset(REGION_IGNORE_ID, name="VarAugRegionsIgnore", num_cases=6, shape=(16, 32, 32),
                                    regions=True, ignore_label=True, seed=3)
    plan_and_preprocess(REGION_IGNORE_ID, ("2d", "3d_fullres"))
    return os.path.basename(folder)


@pytest.mark.nnunet
def test_alignment_2d_regions_ignore_label(region_ignore_dataset):
    trainer, batches, _ = check_alignment(region_ignore_dataset, "2d", 0, "nnUNetTrainer_varaug_p70", 0.7,
                                          num_batches=8)
    assert trainer.label_manager.has_regions and trainer.label_manager.has_ignore_label
    assert as_list(batches[0]["target"])[0].ndim == 4  # (b, regions + ignore, x, y)


@pytest.mark.nnunet
def test_alignment_3d_regions_ignore_label(region_ignore_dataset):
    check_alignment(region_ignore_dataset, "3d_fullres", 0, "nnUNetTrainer_varaug_p30", 0.3, num_batches=10,
                    select_at_load=False)


@pytest.mark.nnunet
def test_named_class_equals_default_varaug(synthetic_3d):
    """nnUNetTrainerVarAug (entry point) behaves as nnUNetTrainer_varaug: same mixin, p, hooks and pipeline."""
    from nnunet_varaug.training.registry import resolve
    from nnunet_varaug.training.trainers.varaug import VarAugMixin, nnUNetTrainerVarAug

    named, built = resolve("nnUNetTrainerVarAug"), resolve("nnUNetTrainer_varaug")
    assert named is nnUNetTrainerVarAug
    assert named.__mro__[1:] == built.__mro__[1:] and named.__mro__[1] is VarAugMixin
    assert (named.varaug_p, named.varaug_settings) == (built.varaug_p, built.varaug_settings)
    write_known_sample_set(synthetic_3d["name"], "3d_fullres", 1)
    pipelines = []
    for cls in (named, built):
        trainer = trainer_in_process(cls, synthetic_3d["name"], 1)
        trainer.varaug_prepare()
        rot, dummy, initial, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        pipelines.append(repr(trainer.get_training_transforms(
            trainer.configuration_manager.patch_size, rot, trainer._get_deep_supervision_scales(), mirror, dummy)))
        pipelines.append(repr(trainer.get_tr_and_val_datasets()[0].chooser))
    assert pipelines[:2] == pipelines[2:] and pipelines[1] == "VariabilitySampleTransform(p=0.5, num_samples=2)"


@pytest.mark.e2e
def test_replicas_samples_train_predict(seed_replicas, tmp_path):
    """replicas -> samples -> nnUNetv2_train -tr nnUNetTrainerTiny_varaug -> nnUNetv2_predict, all stock commands."""
    from nnunet_varaug.training.sampleset import manifest_fingerprint

    dataset_id, name = str(seed_replicas["id"]), seed_replicas["name"]
    run_cli("nnunet_varaug", "samples", "-d", dataset_id, "-c", "3d_fullres", "-f", "0", "-n", "3", "-tr", TINY,
            "-device", "cpu")  # default: with TTA, as nnUNetv2_predict
    manifest = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], name, "varaug",
                                           "nnUNetPlans__3d_fullres__fold_0", "manifest.json")))
    assert manifest["tta"] is True
    trainer = f"{TINY}_varaug"
    run_cli("nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", trainer, "-device", "cpu")
    fold_folder = os.path.join(seed_replicas["results"], f"{trainer}__nnUNetPlans__3d_fullres", "fold_0")
    folder = os.path.join(os.environ["nnUNet_preprocessed"], name, "varaug", "nnUNetPlans__3d_fullres__fold_0")
    fingerprint = manifest_fingerprint(folder)
    debug = json.load(open(os.path.join(fold_folder, "debug.json")))
    record = debug["nnunet_varaug"]["sample_set"]
    assert record == {"p": 0.5, "num_samples": 3, "fingerprint": fingerprint, "folder": folder,
                      "select_at_load": True, "source": "in-fold"}
    checkpoint = torch.load(os.path.join(fold_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert checkpoint["nnunet_varaug"]["sample_set"]["fingerprint"] == fingerprint
    assert os.path.isfile(os.path.join(fold_folder, "validation", "summary.json"))
    out = tmp_path / "pred"
    run_cli("nnUNetv2_predict", "-i", os.path.join(seed_replicas["raw"], "imagesTs"), "-o", str(out), "-d",
            dataset_id, "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1")
    assert sorted(f for f in os.listdir(out) if f.endswith(".nii.gz")) == ["case_ts000.nii.gz", "case_ts001.nii.gz"]
