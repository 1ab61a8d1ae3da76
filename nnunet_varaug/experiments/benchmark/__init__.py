"""``nnunet_varaug benchmark``: the whole plugin on a Medical Segmentation Decathlon task, stage by stage.

A Decathlon task folder (``TaskNN_Name`` with imagesTr, labelsTr, imagesTs, dataset.json) goes through::

    convert          nnUNetv2_convert_MSD_dataset                -> $nnUNet_raw/DatasetNNN_Name
    holdout          --test-fraction of the cases moved to imagesHeldOut/labelsHeldOut, before anything is planned
    plan_preprocess  nnUNetv2_plan_and_preprocess -c C           -> plans, preprocessed data (training cases only)
    splits           splits_final.json, --folds folds            -> nnU-Net's own K-fold split of the training cases
    baseline         nnUNetv2_train … -tr BASE                   -> plain nnU-Net, fold F
    replicas         nnunet_varaug replicas -n K                 -> BASE_seed0 … BASE_seed<K-1> (every fold for
                                                                    out-of-fold samples)
    samples          nnunet_varaug samples -n K [--source …]     -> in-fold and/or out-of-fold sample sets
    varaug           nnUNetv2_train … -tr BASE_varaug[_oof]      -> nnU-Net trained with each source's samples
    stability        nnunet_varaug replicas -tr BASE_varaug[_oof] -> (--stability) K seed replicas of each varaug model
    evaluate         nnUNetPredictor + compute_metrics_on_folder -> per-label Dice of every model and the replicas'
                                                                    majority vote on the held-out test split (and fold
                                                                    F's validation), stability metrics
    analyze          nnunet_varaug analyze -i imagesHeldOut      -> the replicas' variability report on the test split

Every step is a subprocess of nnU-Net's or this plugin's own command line (the evaluation uses nnU-Net's predictor
and metrics in-process), with its output in ``OUT/logs/<stage>.log``. A stage is skipped when its outputs are on
disk, so an interrupted benchmark continues where it stopped (trainings continue from ``checkpoint_latest.pth``).
``OUT/benchmark_state.json`` (written atomically) holds the settings, the test split and, per stage, its status and
compute seconds (summed over attempts); ``OUT/results.md`` compares every model on the held-out test split, with
the compute time of every stage, and shows nnU-Net's published figures apart, labelled as what they are.

The package: :mod:`~nnunet_varaug.experiments.benchmark.task` (the Decathlon folder and the target dataset id),
:mod:`~nnunet_varaug.experiments.benchmark.stages` (the stage machine and its state), :mod:`~nnunet_varaug.experiments.benchmark.holdout`
(the test split and the folds), :mod:`~nnunet_varaug.experiments.benchmark.variants` (the compared models),
:mod:`~nnunet_varaug.experiments.benchmark.evaluation` and :mod:`~nnunet_varaug.experiments.benchmark.testset` (Dice, stability),
:mod:`~nnunet_varaug.experiments.benchmark.results` (results.md); the command line is
:mod:`nnunet_varaug.commands.benchmark`.
"""
