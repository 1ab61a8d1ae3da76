"""The random streams of a replica's training kept apart, checked on the data pipeline without training.

Unit: a :class:`RandomStream` and a :class:`SeededWorkerLoader` draw exactly what plain generators seeded with the
documented seeds draw (an independent computation), and leave the global generators alone; ``layout_warning`` on
planted records. nnU-Net's pipeline (tier nnunet): ``_order<K>`` batches hold other cases and patch locations than
``_seed0``'s with the same augmentation parameters sample for sample, ``_aug<K>`` the reverse, ``_init<K>`` the
same batches and other initial weights, and ``_seed<K>``'s batches, which changed with this layout, record it.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import TINY, trainer_in_process
from nnunet_varaug.training.seeding import (STREAM_LAYOUT, RandomStream, SeededWorkerLoader, derive_seed,
                                            layout_warning, restart_streams)


def global_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()


def same_states(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.mark.unit
def test_a_stream_continues_where_it_stopped_and_leaves_the_globals_alone():
    stream = RandomStream(11)
    np.random.seed(5)
    with stream.active():
        first = np.random.uniform(size=3), torch.rand(2), random.random()
    np.random.uniform(size=7)  # draws between two activations do not reach the stream
    after_between = global_states()
    with stream.active():
        second = np.random.uniform(size=3), torch.rand(2), random.random()
    assert same_states(after_between, global_states())
    rs, g, py = np.random.RandomState(11), torch.Generator().manual_seed(11), random.Random(11)
    want = [(rs.uniform(size=3), torch.rand(2, generator=g), py.random()) for _ in range(2)]
    for got, exp in zip((first, second), want):
        assert np.array_equal(got[0], exp[0]) and torch.equal(got[1], exp[1]) and got[2] == exp[2]
    np.random.seed(5)
    np.random.uniform(size=7)
    assert same_states(global_states(), after_between)  # the globals moved by the draws outside the stream only


def fake_transform(**sample):
    """Draws like batchgeneratorsv2's transforms: numpy, torch and python generators."""
    return {"image": sample["image"], "params": (np.random.uniform(), torch.rand(1).item(), random.random())}


class FakeLoader:
    """Draws like nnU-Net's loader: the cases, then per sample a patch location and the sample's transforms."""

    def __init__(self):
        self.transforms = fake_transform
        self.thread = None

    def set_thread_id(self, thread_id):
        self.thread = thread_id

    def __next__(self):
        cases = np.random.choice(10, 2)
        samples = []
        for case in cases:
            location = int(np.random.randint(0, 100))
            samples.append((int(case), location, self.transforms(image=case)["params"]))
        return samples


def oracle_batches(sampling: int, augmentation: int, seed: int, thread: int, n: int) -> list:
    """What the loader must give: its draws replayed on plain generators seeded as documented."""
    rs = np.random.RandomState(derive_seed(sampling, "sampling", seed, thread))
    aug_seed = derive_seed(augmentation, "augmentation", seed, thread)
    ra, ga, pa = np.random.RandomState(aug_seed), torch.Generator().manual_seed(aug_seed), random.Random(aug_seed)
    batches = []
    for _ in range(n):
        cases = rs.choice(10, 2)
        batches.append([(int(c), int(rs.randint(0, 100)),
                         (ra.uniform(), torch.rand(1, generator=ga).item(), pa.random())) for c in cases])
    return batches


@pytest.mark.unit
@pytest.mark.parametrize("thread", [None, 1])
def test_a_loader_draws_sampling_and_augmentation_from_separate_streams(thread):
    """Cases and locations from the sampling stream, every transform call from the augmentation stream, in the
    training process (thread 0) and in a worker (set_thread_id); the globals untouched either way."""
    loader = SeededWorkerLoader(FakeLoader(), seed=123, sampling=3, augmentation=5)
    if thread is not None:
        loader.set_thread_id(thread)
    np.random.seed(0)
    before = global_states()
    got = [next(loader) for _ in range(4)]
    assert same_states(before, global_states())
    assert got == oracle_batches(3, 5, 123, thread or 0, 4)
    # changing one stream's index changes that stream only
    other = SeededWorkerLoader(FakeLoader(), seed=123, sampling=4, augmentation=5)
    if thread is not None:
        other.set_thread_id(thread)
    changed = [next(other) for _ in range(4)]
    assert [[s[2] for s in b] for b in changed] == [[s[2] for s in b] for b in got]  # same augmentation
    assert [[s[:2] for s in b] for b in changed] != [[s[:2] for s in b] for b in got]  # other cases, locations


@pytest.mark.unit
def test_restart_streams_rekeys_a_single_threaded_augmenter():
    """A run continued at epoch e must draw what an uninterrupted run draws from e on: restarting with a key gives
    the batches of a loader built with that key."""
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    augmenter = SingleThreadedAugmenter(SeededWorkerLoader(FakeLoader(), seed=1, sampling=2, augmentation=2), None)
    next(augmenter)
    assert restart_streams(augmenter, 77)
    fresh = SeededWorkerLoader(FakeLoader(), seed=77, sampling=2, augmentation=2)
    assert [next(augmenter) for _ in range(2)] == [next(fresh) for _ in range(2)]
    assert not restart_streams(SingleThreadedAugmenter(FakeLoader(), None), 77)  # not a replica's: untouched


SEED_RECORD_BEFORE = {"trainer": f"{TINY}_seed1", "base": TINY, "seed": {"seed": 1},
                      "determinism": {"device": "cpu"}}  # what the previous version recorded: no "streams"


@pytest.mark.unit
def test_layout_warning_names_the_replicas_of_each_layout():
    new = {"trainer": f"{TINY}_order1", "streams": {"layout": STREAM_LAYOUT, "order": 1}}
    warning = layout_warning({f"{TINY}_seed1": SEED_RECORD_BEFORE, f"{TINY}_order1": new, "missing": None,
                              f"{TINY}_varaug": {"trainer": f"{TINY}_varaug", "varaug": {"p": 0.5}}})
    assert warning is not None
    assert f"layout 1: {TINY}_seed1" in warning and f"layout 2: {TINY}_order1" in warning
    assert "missing" not in warning and "_varaug" not in warning
    assert f"Train {TINY}_seed1 again" in warning
    assert layout_warning({"a": new, "b": dict(new), "c": None}) is None
    assert layout_warning({"a": SEED_RECORD_BEFORE, "b": {"mca": {"stream": 0}}}) is None  # both layout 1


# ---- nnU-Net's own pipeline (tier nnunet) -------------------------------------------------------------------------
def pipeline(name: str, dataset: str, monkeypatch, batches: int = 3):
    """(initial weights, batch keys, per sample: patch location and the parameters of every transform) of the
    first training batches of replica ``name``, without workers; nothing is trained."""
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    log = []
    get_bbox = nnUNetDataLoader.get_bbox

    def logged_bbox(self, *args, **kwargs):
        box = get_bbox(self, *args, **kwargs)
        log.append({"location": [int(v) for v in box[0]], "params": []})
        return box

    def logged_call(self, **data):  # BasicTransform.__call__, the parameters kept
        params = self.get_parameters(**data)
        if log:
            log[-1]["params"].append((type(self).__name__, summary(params)))
        return self.apply(data, **params)

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setattr(nnUNetDataLoader, "get_bbox", logged_bbox)
    monkeypatch.setattr(BasicTransform, "__call__", logged_call)
    trainer = trainer_in_process(name, dataset, 0)
    trainer.initialize()
    weights = torch.cat([p.detach().flatten() for p in trainer.network.parameters()])
    train, _ = trainer.get_dataloaders()
    log.clear()  # nnU-Net draws one batch of each loader while building them
    keys = [[str(k) for k in next(train)["keys"]] for _ in range(batches)]
    return weights, keys, log[:2 * batches], trainer


def summary(value):
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else float(value.double().sum())
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [summary(v) for v in value]
    if isinstance(value, dict):
        return {k: summary(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def seed0_pipeline(synthetic_3d):
    with pytest.MonkeyPatch.context() as mp:
        return pipeline(f"{TINY}_seed0", synthetic_3d["name"], mp)


@pytest.mark.nnunet
def test_order_changes_cases_and_locations_not_augmentation(synthetic_3d, seed0_pipeline, monkeypatch):
    weights, keys, samples, _ = pipeline(f"{TINY}_order1", synthetic_3d["name"], monkeypatch)
    assert torch.equal(weights, seed0_pipeline[0])
    assert keys != seed0_pipeline[1]
    assert [s["location"] for s in samples] != [s["location"] for s in seed0_pipeline[2]]
    assert [s["params"] for s in samples] == [s["params"] for s in seed0_pipeline[2]]  # sample for sample
    assert all(s["params"] for s in samples)


@pytest.mark.nnunet
def test_aug_changes_augmentation_not_cases_or_locations(synthetic_3d, seed0_pipeline, monkeypatch):
    weights, keys, samples, _ = pipeline(f"{TINY}_aug1", synthetic_3d["name"], monkeypatch)
    assert torch.equal(weights, seed0_pipeline[0])
    assert keys == seed0_pipeline[1]
    assert [s["location"] for s in samples] == [s["location"] for s in seed0_pipeline[2]]
    differ = [a["params"] != b["params"] for a, b in zip(samples, seed0_pipeline[2])]
    assert sum(differ) >= len(differ) // 2, differ


@pytest.mark.nnunet
def test_init_changes_initial_weights_not_batches(synthetic_3d, seed0_pipeline, monkeypatch):
    weights, keys, samples, _ = pipeline(f"{TINY}_init1", synthetic_3d["name"], monkeypatch)
    assert not torch.equal(weights, seed0_pipeline[0])
    assert keys == seed0_pipeline[1] and samples == seed0_pipeline[2]


#: The first three batches' cases of nnUNetTrainerTiny_seed0 on this dataset (0 workers), recorded with the
#: previous version (layout 1: sampling and augmentation interleaved on one generator) before this change.
SEED0_KEYS_LAYOUT_1 = [["case_tr005", "case_tr008"], ["case_tr008", "case_tr008"], ["case_tr009", "case_tr006"]]


@pytest.mark.nnunet
def test_seed_replicas_batches_changed_and_carry_the_new_layout(synthetic_3d, seed0_pipeline):
    """Keeping both streams apart changes _seed<K>'s batches: the version records its layout, and analyze can warn
    when replicas of two layouts are compared."""
    _, keys, _, trainer = seed0_pipeline
    assert keys != SEED0_KEYS_LAYOUT_1
    record = trainer.varaug_record()
    assert record["streams"] == {"layout": STREAM_LAYOUT, "init": 0, "order": 0, "aug": 0, "train": 0}
    assert STREAM_LAYOUT == 2
    assert layout_warning({"before": SEED_RECORD_BEFORE, "now": record}) is not None
