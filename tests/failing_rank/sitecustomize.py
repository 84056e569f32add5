"""Loaded at start-up by every process whose PYTHONPATH holds this folder: makes one rank raise during training.

SPARSETUNE_TEST_FAIL="RANK:STEP" makes rank RANK raise a RuntimeError as optimizer step STEP ends (when the
trainer advances its learning-rate schedule), a stand-in for any failure one rank alone meets (memory, a device,
a bug), so tests can see how the other ranks stop.
"""

import os

if spec := os.environ.get("SPARSETUNE_TEST_FAIL"):
    rank, step = (int(v) for v in spec.split(":"))
    if int(os.environ.get("RANK", "-1")) == rank:
        from torch.optim.lr_scheduler import LambdaLR

        advance = LambdaLR.step

        def failing_step(self, *args, **kwargs):
            if self.last_epoch == step - 1:  # the constructor's own call has made last_epoch 0
                raise RuntimeError(f"injected failure on rank {rank} after step {step}")
            return advance(self, *args, **kwargs)

        LambdaLR.step = failing_step
