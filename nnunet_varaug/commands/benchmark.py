"""``nnunet_varaug benchmark``: the Medical Segmentation Decathlon benchmark, stage by stage — its flags, the stage
selection and the run (the stages and what they write: :mod:`nnunet_varaug.experiments.benchmark`)."""
from __future__ import annotations

import argparse
import os
import re
from typing import List, Optional

from nnunet_varaug.commands.flags import add_device, add_trainer_arguments
from nnunet_varaug.experiments.benchmark import stages as benchmark_stages
from nnunet_varaug.experiments.benchmark.state import STAGES, Benchmark
from nnunet_varaug.experiments.benchmark.task import read_msd_task
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.paths import require_env


def parse_stages(text: Optional[str]) -> List[str]:
    if text is None or text.strip() in ("", "all"):
        return list(STAGES)
    asked = [s.strip() for s in re.split(r"[,\s]+", text.strip()) if s.strip()]
    unknown = [s for s in asked if s not in STAGES]
    if unknown:
        raise VarAugError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in asked]  # always in pipeline order


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--msd", required=True, metavar="TASK_FOLDER",
                   help="an extracted Decathlon task, e.g. /data/Task04_Hippocampus (imagesTr, labelsTr, imagesTs, "
                        "dataset.json)")
    p.add_argument("-d", dest="dataset_id", type=int, default=None,
                   help="nnU-Net dataset id to convert the task to (default: the task's number)")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("-f", dest="fold", default="0", help="fold (default 0)")
    p.add_argument("-n", dest="num_replicas", type=int, default=5, help="number of seed replicas K (default 5)")
    add_trainer_arguments(p)
    p.add_argument("-pl", dest="planner", default="ExperimentPlanner",
                   help="planner for plan_preprocess (default ExperimentPlanner, which writes nnUNetPlans)")
    p.add_argument("--varaug-p", dest="p", type=int, default=None, metavar="NN",
                   help="probability (percent) of training on a variability sample: trains <BASE>_varaug_p<NN> "
                        "(default: <BASE>_varaug, p = 0.5)")
    p.add_argument("-o", dest="output", default=None,
                   help="output folder for results.md, the state, logs, evaluation and analysis "
                        "(default ./varaug_benchmark_<TaskNN_Name>)")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all, in this order)")
    add_device(p, "nnUNetv2_train")
    p.add_argument("--devices", default=None, metavar="0,1,…",
                   help="GPUs to train on, one model per GPU at a time: the replicas (replicas --devices), the "
                        "stability replicas, and the in-fold and out-of-fold varaug models side by side")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="processes for conversion, preprocessing and evaluation (default: nnU-Net's)")
    p.add_argument("--test-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of the labelled cases held out as a test split before anything is planned or "
                        "trained; every model is compared on it (default 0.2)")
    p.add_argument("--test-seed", type=int, default=0, help="seed of the test split's draw (default 0)")
    p.add_argument("--folds", dest="num_folds", type=int, default=5,
                   help="folds of the splits_final.json the benchmark writes over the remaining cases (nnU-Net's own "
                        "split, seed 12345; default 5, nnU-Net's default)")
    p.add_argument("--sources", nargs="+", default=["in-fold"], choices=["in-fold", "out-of-fold"],
                   help="sample sources to train variability-augmented models with, side by side (default in-fold; "
                        "out-of-fold trains K replicas on every fold and <BASE>_varaug_oof)")
    p.add_argument("--stability", action="store_true",
                   help="also train K seed replicas of each variability-augmented model (<varaug>_seed<k>) and "
                        "report their pairwise Dice and volume spread beside the plain replicas'")


def run(args: argparse.Namespace) -> int:
    for var, what in (("nnUNet_raw", "the converted task goes there"),
                      ("nnUNet_preprocessed", "plans and preprocessed data go there"),
                      ("nnUNet_results", "trained models go there")):
        require_env(var, what)
    stages = parse_stages(args.stages)
    task = read_msd_task(args.msd)
    out = args.output or os.path.join(os.getcwd(), f"varaug_benchmark_{task.folder_name}")
    bench = Benchmark(task, out, args.dataset_id, args.configuration, args.fold, args.num_replicas, args.base,
                      args.plans, args.planner, args.device, args.num_processes, args.p, args.devices,
                      args.test_fraction, args.test_seed, args.num_folds, args.sources, args.stability)
    return benchmark_stages.run(bench, stages)
