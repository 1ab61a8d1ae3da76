"""What a checkpoint after every epoch costs a seed replica (nnunet_varaug.training.preemption).

nnU-Net writes ``checkpoint_latest.pth`` every 50 epochs with one ``torch.save``. A seed or numerical replica writes
it after every epoch through the real mixins of a seed replica (``PreemptibleTrainingMixin`` then
``RecordSettingsMixin`` over a stand-in for nnU-Net's ``save_checkpoint``, one ``torch.save`` of the dict): to a
temporary name, the settings record added as nnU-Net's ``torch.save`` writes it, then renamed over the old file. This
script builds the network nnU-Net plans for a typical 3D dataset (``PlainConvUNet``, 6 stages of 32..320 features,
two 3x3x3 convolutions per stage, instance norm, deep supervision) with the SGD optimizer of nnUNetTrainer after one
step (so that its momentum buffers exist), and times both writes, interleaved ``--repeats`` times, into ``--folder``
(default: a temporary folder; pass one on the file system your nnUNet_results live on): the time the training
waits (the writes land in the page cache, as in training), and with ``os.sync()`` after each write (the bytes on
the disk). It prints the checkpoint's size, the median time of each write and their ratio.

    python benchmarks/bench_checkpoint.py [--repeats 5] [--folder DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def network_and_optimizer():
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(1, 6, [32, 64, 128, 256, 320, 320], torch.nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], 2, 2,
                        [2] * 5, conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5,
                        "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                        deep_supervision=True)
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    out = net(torch.randn(1, 1, 64, 64, 64))
    sum(o.float().mean() for o in out).backward()
    optimizer.step()
    return net, optimizer


def checkpoint(net, optimizer) -> dict:
    """What nnU-Net's save_checkpoint stores (the logger's values left small)."""
    return {"network_weights": net.state_dict(), "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": None, "logging": {"train_losses": [0.5] * 1000}, "_best_ema": 0.5,
            "current_epoch": 500, "init_args": {}, "trainer_name": "nnUNetTrainer_seed0",
            "inference_allowed_mirroring_axes": (0, 1, 2)}


def nnunet_write(content: dict, path: str) -> None:
    import torch

    torch.save(content, path)


def replica_write(content: dict, path: str) -> None:
    """The seed replica's write, through the mixins its trainer uses (module docstring)."""
    import torch

    from nnunet_varaug.training.preemption import PreemptibleTrainingMixin
    from nnunet_varaug.training.trainers.common import RecordSettingsMixin

    class NnUNetSave:  # what nnUNetTrainer.save_checkpoint does on rank 0
        local_rank, disable_checkpointing, current_epoch = 0, False, 499

        def save_checkpoint(self, filename: str) -> None:
            torch.save(content, filename)

    class Replica(PreemptibleTrainingMixin, RecordSettingsMixin, NnUNetSave):
        varaug_settings = {"seed": {"seed": 0}}

    Replica().save_checkpoint(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    net, optimizer = network_and_optimizer()
    content = checkpoint(net, optimizer)
    params = sum(p.numel() for p in net.parameters())
    print(f"network: {params / 1e6:.1f} M parameters")
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = os.path.join(folder, "checkpoint_latest.pth")
        for sync in (False, True):
            times = {"nnU-Net's torch.save": [], "seed replica's write": []}
            for _ in range(args.repeats):
                for name, write in (("nnU-Net's torch.save", nnunet_write), ("seed replica's write", replica_write)):
                    os.sync()
                    start = time.perf_counter()
                    write(content, path)
                    if sync:
                        os.sync()  # count the bytes reaching the disk, not the page cache
                    times[name].append(time.perf_counter() - start)
            print(f"checkpoint {os.path.getsize(path) / 2 ** 20:.0f} MiB (weights + SGD momentum); "
                  f"{'with os.sync() (on the disk)' if sync else 'page cache (what the training waits for)'}:")
            medians = {name: statistics.median(t) for name, t in times.items()}
            for name, median in medians.items():
                print(f"  {name}: median {median:.3f} s (runs: {', '.join(f'{t:.3f}' for t in times[name])})")
            ratio = medians["seed replica's write"] / medians["nnU-Net's torch.save"]
            print(f"  ratio seed replica / nnU-Net per write: {ratio:.2f}")


if __name__ == "__main__":
    main()
