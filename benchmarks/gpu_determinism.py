"""Is a seed replica bitwise reproducible on a GPU? Train the same ``_seed`` replica twice on CUDA and compare.

The same replica name (``nnUNetTrainerTiny_seed0`` by default) is trained twice through the real
``nnUNetv2_train -device cuda``, each time in its own ``nnUNet_results`` folder, on a synthetic dataset planned and
preprocessed by nnU-Net in a temporary folder (or on your dataset with ``-d``, already preprocessed). The two
``checkpoint_final.pth`` are compared tensor by tensor with ``torch.equal`` (bitwise), and what the trainer
arranged for determinism (``nnunet_varaug.determinism`` in debug.json: deterministic algorithms, cuDNN flags,
CUBLAS_WORKSPACE_CONFIG, compile, the ops that had no deterministic kernel) is printed next to the verdict.
``nnUNet_compile`` is left as you set it (unset: the replica does not compile).

    python benchmarks/gpu_determinism.py                  # tiny trainer, synthetic 32^3 dataset, 2 x 5 epochs
    python benchmarks/gpu_determinism.py -d 4 -tr nnUNetTrainer_5epochs   # your preprocessed dataset

Exits 0 if the weights are bitwise equal, 1 if not, 2 without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SYNTHETIC_ID = 997


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", dest="dataset", default=None,
                   help="a preprocessed dataset (name or id) in your nnUNet_preprocessed; default: a synthetic one")
    p.add_argument("-c", dest="configuration", default="3d_fullres")
    p.add_argument("-f", dest="fold", default="0")
    p.add_argument("-tr", dest="base", default="nnUNetTrainerTiny", help="base trainer (default nnUNetTrainerTiny)")
    p.add_argument("--seed", type=int, default=0, help="replica index K of <base>_seed<K> (default 0)")
    p.add_argument("--epochs", type=int, default=5, help="nnUNetTrainerTiny: epochs (default 5)")
    p.add_argument("--iterations", type=int, default=10, help="nnUNetTrainerTiny: iterations per epoch (default 10)")
    p.add_argument("--workers", type=int, default=2, help="nnUNet_n_proc_DA (default 2)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (the check); cpu only tries this script itself (the CPU is covered by the tests)")
    p.add_argument("-o", dest="output", default=None, help="keep the runs here (default: a temporary folder)")
    return p.parse_args(argv)


def tool(name: str) -> str:
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.isfile(local) else name


def run(cmd, env) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode})")


def main(argv=None) -> int:
    import torch

    from nnunet_varaug.training.registry import ext_trainer_value

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (nothing was run)")
        return 2
    root = args.output or tempfile.mkdtemp(prefix="varaug_gpu_determinism_")
    env = dict(os.environ, nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer", "")),
               nnUNet_n_proc_DA=str(args.workers), VARAUG_TINY_EPOCHS=str(args.epochs),
               VARAUG_TINY_ITERATIONS=str(args.iterations))
    dataset = args.dataset
    if dataset is None:
        from nnunet_varaug.experiments.datasets import make_synthetic_dataset

        env.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "preprocessed"))
        for key in ("nnUNet_raw", "nnUNet_preprocessed"):
            os.makedirs(env[key], exist_ok=True)
        make_synthetic_dataset(SYNTHETIC_ID, env["nnUNet_raw"], num_cases=10, num_test_cases=0, seed=1)
        run([tool("nnUNetv2_plan_and_preprocess"), "-d", str(SYNTHETIC_ID), "-c", args.configuration,
             "-np", "2", "-npfp", "2"], dict(env, nnUNet_n_proc_DA="2"))
        dataset = str(SYNTHETIC_ID)
    trainer = f"{args.base}_seed{args.seed}"
    weights, records, seconds = [], [], []
    for run_name in ("a", "b"):
        results = os.path.join(root, f"results_{run_name}")
        os.makedirs(results, exist_ok=True)
        t0 = time.time()
        run([tool("nnUNetv2_train"), dataset, args.configuration, args.fold, "-tr", trainer, "-device", args.device],
            dict(env, nnUNet_results=results))
        seconds.append(time.time() - t0)
        found = [os.path.join(d, "checkpoint_final.pth") for d, _, files in os.walk(results)
                 if "checkpoint_final.pth" in files and f"{trainer}__" in d]
        if len(found) != 1:
            raise SystemExit(f"expected one checkpoint_final.pth of {trainer} under {results}, found {found}")
        ckpt = torch.load(found[0], map_location="cpu", weights_only=False)
        weights.append(ckpt["network_weights"])
        records.append(ckpt.get("nnunet_varaug", {}).get("determinism"))
    a, b = weights
    differing = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    equal = a.keys() == b.keys() and not differing
    print(json.dumps({"trainer": trainer, "dataset": dataset, "configuration": args.configuration,
                      "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                      "torch": torch.__version__,
                      "cudnn": torch.backends.cudnn.version(), "seconds_per_run": [round(s) for s in seconds],
                      "tensors": len(a), "tensors_differing": len(differing),
                      "determinism_recorded": records[0]}, indent=2))
    verdict = "bitwise EQUAL" if equal else "DIFFERENT"
    print(f"RESULT: {verdict} final weights of {trainer} trained twice on {args.device}"
          + ("" if equal else f" ({len(differing)} of {len(a)} tensors differ, e.g. {differing[:3]})"))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
