"""``nnUNetTrainerTiny``: nnU-Net's own trainer with a narrow network and a few short epochs.

For tests and the CPU demo only: same plans, data pipeline, loss and validation as ``nnUNetTrainer``, but the
network's feature widths are divided by 4 (minimum 4) and training is short. ``VARAUG_TINY_EPOCHS`` and
``VARAUG_TINY_ITERATIONS`` change the length (recorded in debug.json like every trainer attribute). It checkpoints
every epoch (the resume tests interrupt after one) but draws nnU-Net's progress.png only after the last epoch:
with epochs of a few seconds, redrawing the plot each epoch is a large share of the run. Its test-time mirroring
(nnU-Net's final validation, ``nnUNetv2_predict`` and every prediction of the plugin) flips along the first mirror
axis only: 2 network passes per patch instead of 8 in 3D, which made test-time augmentation most of the test
suite's prediction time; the mirroring code path is the same, training's mirroring augmentation is nnU-Net's.
Its final validation is nnU-Net's own, with the export and metrics process pools run in the trainer's process
(:mod:`nnunet_varaug.utilities.inprocess`): booting those two spawned workers took longer than the rest of the validation.
On the CPU it keeps to ``OMP_NUM_THREADS`` threads where that is set (``nnUNetv2_train -device cpu`` gives torch one
thread per core whatever it says): the demo and the tests train two tiny models at once, one thread each, and a
network this small gains little from a second thread.
"""
from __future__ import annotations

import copy
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans


class nnUNetTrainerTiny(nnUNetTrainer):
    """A few short epochs of a network 4x narrower than planned, checkpointing every epoch, mirroring one axis at
    test time, validating without worker processes."""

    width_divisor = 4

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("VARAUG_TINY_EPOCHS", 2))
        self.num_iterations_per_epoch = int(os.environ.get("VARAUG_TINY_ITERATIONS", 4))
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if self.device.type == "cpu" and threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))  # nnUNetv2_train gave torch one thread per core (module docstring)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # inference only (nnU-Net stores it in the checkpoint for nnUNetv2_predict); training keeps mirror_axes
        self.inference_allowed_mirroring_axes = tuple(mirror_axes[:1]) if mirror_axes else mirror_axes
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def on_epoch_end(self):
        plot = self.logger.plot_progress_png
        if self.current_epoch != self.num_epochs - 1:
            self.logger.plot_progress_png = lambda *args, **kwargs: None
        try:
            super().on_epoch_end()
        finally:
            self.logger.plot_progress_png = plot

    def perform_actual_validation(self, save_probabilities: bool = False):
        from nnunetv2.evaluation import evaluate_predictions
        from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

        from nnunet_varaug.utilities.inprocess import pools_in_this_process

        with pools_in_this_process(trainer_module, evaluate_predictions):
            super().perform_actual_validation(save_probabilities)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        kwargs = copy.deepcopy(configuration_manager.network_arch_init_kwargs)
        kwargs["features_per_stage"] = [max(4, int(f) // nnUNetTrainerTiny.width_divisor)
                                        for f in kwargs["features_per_stage"]]
        return get_network_from_plans(configuration_manager.network_arch_class_name, kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)
