"""The source of ``PausingTiny``, a user trainer for nnUNet_extTrainer shared by the preemption tests
(tests/training/test_preemption.py) and the SLURM tests (tests/launch/test_slurm_cluster.py)."""
import textwrap

PAUSING_TRAINER = textwrap.dedent('''
    import os
    import time

    from nnunet_varaug.training.trainers.tiny import nnUNetTrainerTiny


    class PausingTiny(nnUNetTrainerTiny):
        """nnUNetTrainerTiny that, with VARAUG_TEST_PAUSE naming a folder, waits after the first epoch of a fresh run
        (its checkpoint written) until a signal stops it, announcing the wait with <folder>/<trainer>.paused."""

        def on_epoch_end(self):
            super().on_epoch_end()
            folder = os.environ.get("VARAUG_TEST_PAUSE")
            if folder and self.current_epoch == 1:
                open(os.path.join(folder, type(self).__name__ + ".paused"), "w").close()
                deadline = time.time() + 600
                while time.time() < deadline:
                    time.sleep(0.05)
''')
