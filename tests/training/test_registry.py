"""The trainer-name grammar, the lookup through nnU-Net's own finder, entry points, caching and pickling."""
from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from nnunet_varaug.utilities import names

from nnunet_varaug.training import registry
from nnunet_varaug.utilities.names import TrainerNameError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name, expected", [
    ("nnUNetTrainer_seed0", ("nnUNetTrainer", "seed", {"seed": 0})),
    ("nnUNetTrainer_seed17", ("nnUNetTrainer", "seed", {"seed": 17})),
    ("nnUNetTrainer_250epochs_seed3", ("nnUNetTrainer_250epochs", "seed", {"seed": 3})),
    ("nnUNetTrainer_mca2", ("nnUNetTrainer", "mca", {"stream": 2, "virtual_bits": None})),
    ("nnUNetTrainer_mca2_t16", ("nnUNetTrainer", "mca", {"stream": 2, "virtual_bits": 16})),
    ("nnUNetTrainer_varaug", ("nnUNetTrainer", "varaug", {"p": 0.5})),
    ("nnUNetTrainer_varaug_p25", ("nnUNetTrainer", "varaug", {"p": 0.25})),
    ("nnUNetTrainer_varaug_p100", ("nnUNetTrainer", "varaug", {"p": 1.0})),
    ("nnUNetTrainer_varaug_seed2", ("nnUNetTrainer_varaug", "seed", {"seed": 2})),
    ("nnUNetTrainer_mca2_instr", ("nnUNetTrainer", "mca", {"stream": 2, "virtual_bits": None,
                                                           "granularity": "instruction"})),
    ("nnUNetTrainer_mca0_t12_instr", ("nnUNetTrainer", "mca", {"stream": 0, "virtual_bits": 12,
                                                               "granularity": "instruction"})),
    ("nnUNetTrainer_ieee", ("nnUNetTrainer", "ieee", {})),
    ("nnUNetTrainer_250epochs_ieee", ("nnUNetTrainer_250epochs", "ieee", {})),
    ("nnUNetTrainer_init0", ("nnUNetTrainer", "init", {"stream": 0})),
    ("nnUNetTrainer_order12", ("nnUNetTrainer", "order", {"stream": 12})),
    ("nnUNetTrainer_aug3", ("nnUNetTrainer", "aug", {"stream": 3})),
    ("nnUNetTrainer_nondet1", ("nnUNetTrainer", "nondet", {"run": 1})),
    ("nnUNetTrainer_varaug_aug2", ("nnUNetTrainer_varaug", "aug", {"stream": 2})),
])
def test_grammar_parses(name, expected):
    assert names.parse(name) == expected


@pytest.mark.parametrize("name", ["nnUNetTrainer", "nnUNetTrainerTiny", "MyTrainer_250epochs", "MyTrainer_augmented",
                                  "MyTrainer_initial", "MyTrainer_ordered"])
def test_names_without_suffix_are_not_ours(name):
    assert names.parse(name) is None


@pytest.mark.parametrize("name", [
    "nnUNetTrainer_seedx", "nnUNetTrainer_seed-1", "nnUNetTrainer_seed01", "nnUNetTrainer_seed",
    "nnUNet__Trainer_seed1", "nnUNetTrainer_seed1_extra", "nnUNetTrainer_mca1_t0", "nnUNetTrainer_mca1_t60",
    "nnUNetTrainer_varaug_p101", "nnUNetTrainer_varaug_px", "_seed1",
    "nnUNetTrainer_mca1_t25", "nnUNetTrainer_mca1_instr_t16", "nnUNetTrainer_mca_instr", "nnUNetTrainer_ieee1",
    "nnUNetTrainer_ieee_t16", "nnUNetTrainer_mca1_instr2",
    "nnUNetTrainer_aug", "nnUNetTrainer_order01", "nnUNetTrainer_init-1", "nnUNetTrainer_nondet", "nnUNetTrainer_aug1_x",
])
def test_malformed_names_state_the_grammar(name):
    with pytest.raises(TrainerNameError, match=r"<Base>_seed<K>"):
        names.parse(name) if name != "_seed1" else registry.resolve(name)


def test_resolve_builds_once_and_keeps_nnunet_constructor():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_varaug.training.trainers.replica import SeedReplicaMixin

    cls = registry.resolve("nnUNetTrainer_seed3")
    assert cls is registry.resolve("nnUNetTrainer_seed3")
    assert cls.__name__ == "nnUNetTrainer_seed3" and issubclass(cls, nnUNetTrainer)
    assert issubclass(cls, SeedReplicaMixin) and cls.replica_seed == 3
    assert cls.varaug_settings == {"seed": {"seed": 3}}
    assert inspect.signature(cls.__init__) == inspect.signature(nnUNetTrainer.__init__)
    assert registry.resolve("nnUNetTrainer_seed4").replica_seed == 4


def test_classes_pickle_by_name():
    cls = registry.resolve("nnUNetTrainerTiny_seed5")
    assert cls.__module__ == "nnunet_varaug.training.registry"
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_builtin_variant_and_entry_point_bases():
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import \
        nnUNetTrainer_250epochs
    from nnunet_varaug.training.trainers.tiny import nnUNetTrainerTiny

    assert issubclass(registry.resolve("nnUNetTrainer_250epochs_seed1"), nnUNetTrainer_250epochs)
    assert registry.resolve("nnUNetTrainerTiny") is nnUNetTrainerTiny
    assert issubclass(registry.resolve("nnUNetTrainerTiny_seed2"), nnUNetTrainerTiny)
    assert "nnUNetTrainerTiny" in names.entry_point_names()


def test_unknown_base_names_the_grammar():
    with pytest.raises(TrainerNameError, match="NoSuchTrainer.*<Base>_seed<K>"):
        registry.resolve("NoSuchTrainer_seed1")


def test_env_value_keeps_user_folders_and_lists_ours_once(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    value = registry.ext_trainer_value(os.pathsep.join([a, registry.LOOKUP_FOLDER, b]))
    assert value.split(os.pathsep) == [a, b, registry.LOOKUP_FOLDER]
    assert registry.ext_trainer_value("") == registry.LOOKUP_FOLDER


def _lookup_in_fresh_process(names, ext: str) -> dict:
    """Ask nnU-Net's own trainer finder for each of ``names``, as nnUNetv2_train does, in one clean interpreter
    (one start-up: importing nnU-Net's trainer modules is most of the cost). Returns name -> the line printed:
    ``FOUND <class> <bases> <settings>`` or ``ERROR <exception type>: <message>``."""
    code = textwrap.dedent(f"""
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        for name in {list(names)!r}:
            try:
                cls = recursive_find_trainer_class_by_name(name)
                line = f"FOUND {{cls.__name__}} {{[c.__name__ for c in cls.__bases__]}} {{cls.varaug_settings}}"
            except Exception as e:
                line = f"ERROR {{type(e).__name__}}: {{e}}"
            print(name, "=>", " ".join(line.split()))
    """)
    env = dict(os.environ, nnUNet_extTrainer=ext)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(" => ", 1) for line in proc.stdout.splitlines() if " => " in line)


def test_nnunet_finds_replicas_of_a_base_from_a_user_folder(tmp_path):
    """A base trainer in the user's own nnUNet_extTrainer folder gets `_seed3` appended; a malformed name stops
    nnU-Net's search with the grammar; an unrelated unknown name still gets nnU-Net's own error."""
    user = tmp_path / "my_trainers"
    user.mkdir()
    (user / "my_trainer_module.py").write_text(textwrap.dedent("""
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        class MyTrainer(nnUNetTrainer):
            pass
    """))
    ext = registry.ext_trainer_value(str(user))
    found = _lookup_in_fresh_process(["MyTrainer_seed3", "MyTrainer_seedx", "CompletelyUnknownTrainer"], ext)
    assert found["MyTrainer_seed3"] == "FOUND MyTrainer_seed3 ['SeedReplicaMixin', 'MyTrainer'] {'seed': {'seed': 3}}"
    bad = found["MyTrainer_seedx"]
    assert bad.startswith("ERROR TrainerNameError") and "<Base>_seed<K>" in bad
    assert found["CompletelyUnknownTrainer"].startswith("ERROR") and \
        "Could not find requested nnunet trainer" in found["CompletelyUnknownTrainer"]


def test_one_source_classes_change_one_stream_of_seed0():
    """Each one-source class draws every stream as _seed0 except its own (K); replica_name formats them."""
    from nnunet_varaug.training.trainers.one_source import (AugReplicaMixin, InitReplicaMixin, NondetReplicaMixin,
                                                            OrderReplicaMixin)

    expected = {"init": InitReplicaMixin, "order": OrderReplicaMixin, "aug": AugReplicaMixin}
    for source, mixin in expected.items():
        name = names.replica_name("nnUNetTrainerTiny", source, 4)
        assert name == f"nnUNetTrainerTiny_{source}4"
        instance = object.__new__(registry.resolve(name))
        assert isinstance(instance, mixin) and instance.varaug_settings == {source: {"stream": 4}}
        assert {s: instance.stream_seed(s) for s in instance.STREAMS} == {
            s: 4 if s == source else 0 for s in ("init", "order", "aug", "train")}
    seed = object.__new__(registry.resolve("nnUNetTrainerTiny_seed4"))
    assert {s: seed.stream_seed(s) for s in seed.STREAMS} == {"init": 4, "order": 4, "aug": 4, "train": 4}
    assert issubclass(registry.resolve("nnUNetTrainerTiny_nondet2"), NondetReplicaMixin)
