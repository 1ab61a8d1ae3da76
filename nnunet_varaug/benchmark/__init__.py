"""``nnunet_varaug benchmark``: the whole plugin on a Medical Segmentation Decathlon task, stage by stage.

A Decathlon task folder (``TaskNN_Name`` with imagesTr, labelsTr, imagesTs, dataset.json) goes through::

    convert          nnUNetv2_convert_MSD_dataset                -> $nnUNet_raw/DatasetNNN_Name
    plan_preprocess  nnUNetv2_plan_and_preprocess -c C           -> plans, preprocessed data
    baseline         nnUNetv2_train … -tr BASE                   -> plain nnU-Net, fold F
    replicas         nnunet_varaug replicas -n K                 -> BASE_seed0 … BASE_seed<K-1>
    samples          nnunet_varaug samples -n K                  -> their label maps of the training cases
    varaug           nnUNetv2_train … -tr BASE_varaug            -> nnU-Net trained with those samples
    evaluate         nnU-Net's compute_metrics_on_folder         -> per-label Dice on fold F's validation cases of
                                                                    baseline, each replica, their majority vote, varaug
    analyze          nnunet_varaug analyze -n K -o OUT/analysis  -> the variability report

Every step is a subprocess of nnU-Net's or this plugin's own command line (nothing is re-implemented), with its
output in ``OUT/logs/<stage>.log``. A stage is skipped when its outputs are on disk, so an interrupted benchmark
continues where it stopped (trainings continue from ``checkpoint_latest.pth``). ``OUT/benchmark_state.json``
(written atomically) holds the settings and, per stage, its status and compute seconds (summed over attempts);
``OUT/results.md`` puts the Dice of every model next to nnU-Net's published numbers for the task, with the
compute time of every stage.

The package: :mod:`~nnunet_varaug.benchmark.task` (the Decathlon folder and the target dataset id),
:mod:`~nnunet_varaug.benchmark.stages` (the stage machine and its state), :mod:`~nnunet_varaug.benchmark.evaluation`
(Dice), :mod:`~nnunet_varaug.benchmark.results` (results.md) and :mod:`~nnunet_varaug.benchmark.cli` (the command
line); this file only names what they export.
"""
from nnunet_varaug.benchmark.cli import configure_parser, parse_stages, run
from nnunet_varaug.benchmark.results import PUBLISHED_DICE, render_results, write_results
from nnunet_varaug.benchmark.stages import REQUIRES, STAGES, STATE_FILE, Benchmark, StageFailed
from nnunet_varaug.benchmark.task import MsdTask, read_msd_task

__all__ = ["Benchmark", "MsdTask", "PUBLISHED_DICE", "REQUIRES", "STAGES", "STATE_FILE", "StageFailed",
           "configure_parser", "parse_stages", "read_msd_task", "render_results", "run", "write_results"]
