"""The code that runs inside ``nnUNetv2_train`` stays free of the command layer.

nnU-Net imports the plugin's trainers in every training process (and in every data-augmentation worker that
unpickles a trainer's dataset). Those imports must not pull in the commands (``replicas``, ``samples``,
``analyze``, ``benchmark``, ``downstream``, ``demo``, the CLI), their helpers (``Experiment``, the process runner,
the predictor, SLURM) nor submitit: a cycle through them once ran ``registry -> trainers.varaug -> samples ->
launch -> experiment -> registry``. Checked in a fresh interpreter, so nothing imported by other tests counts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

COMMAND_LAYER = ("nnunet_varaug.analyze", "nnunet_varaug.benchmark", "nnunet_varaug.cli", "nnunet_varaug.demo",
                 "nnunet_varaug.downstream", "nnunet_varaug.experiment", "nnunet_varaug.launch",
                 "nnunet_varaug.predictor", "nnunet_varaug.replicas", "nnunet_varaug.report",
                 "nnunet_varaug.runner", "nnunet_varaug.samples", "nnunet_varaug.slurm", "nnunet_varaug.predict",
                 "nnunet_varaug.calibration", "nnunet_varaug.overlays", "nnunet_varaug.downstream_protocol",
                 "nnunet_varaug.downstream_data", "nnunet_varaug.cases", "submitit")

# What a _varaug training touches of the plugin outside nnU-Net's own calls: the trainer module, the registry's
# classes for a varaug and a seed name, the fix command of an error message, the sample-set checks and dataset.
PROBE = r"""
import json, sys, types
import nnunet_varaug.trainers.varaug as varaug
from nnunet_varaug import registry
registry.resolve("nnUNetTrainer_varaug_p25")
registry.resolve("nnUNetTrainer_seed3")
fake = types.SimpleNamespace(plans_manager=types.SimpleNamespace(dataset_name="Dataset004_Hippocampus",
                                                                 plans_name="nnUNetPlans"),
                             configuration_name="3d_fullres", fold=0)
command = varaug.VarAugMixin.varaug_fix_command(fake)
from nnunet_varaug import sampleset
from nnunet_varaug.errors import VarAugError
try:
    sampleset.validate_sample_set("/nonexistent", plans="nnUNetPlans", configuration="3d_fullres", fold=0,
                                  cases=[], shapes={}, fix=command)
except VarAugError:
    pass
registry.resolve("nnUNetTrainer_varaug_oof")  # the out-of-fold reading side, as a _oof trainer uses it
from nnunet_varaug import outoffold
try:
    outoffold.validate_out_of_fold_set("/nonexistent", plans="nnUNetPlans", configuration="3d_fullres", fold=0,
                                       cases=[], splits=[], shapes={},
                                       fix=outoffold.trainer_fix_command("Dataset004_Hippocampus", "nnUNetPlans",
                                                                         "3d_fullres", "nnUNetTrainer", 5))
except VarAugError:
    pass
from nnunet_varaug.sampleset import VariabilitySampleDataset  # noqa: F401
import nnunet_varaug.transforms  # noqa: F401
print(json.dumps({"modules": sorted(sys.modules), "command": command}))
"""


def test_training_path_imports_no_command_module(tmp_path):
    env = dict(os.environ, nnUNet_results=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = [m for m in result["modules"] if any(m == c or m.startswith(c + ".") for c in COMMAND_LAYER)]
    assert loaded == [], f"the training path imported command-layer modules: {loaded}"
    # the probe really ran the error path: no replica is trained, so the fix names the replicas command first
    assert result["command"].startswith("nnunet_varaug replicas -d 4 -c 3d_fullres -f 0 -n 10")
