"""Fault injection for tests, loaded at start-up by every process whose PYTHONPATH holds this folder.

SPARSETUNE_TEST_FAIL="RANK:STEP": rank RANK raises a RuntimeError as optimizer step STEP ends (when the trainer
advances its learning-rate schedule), a stand-in for any failure one rank alone meets, so tests can see how the
other ranks stop.

SPARSETUNE_TEST_KILL="MOMENT:N": the process SIGKILLs itself (no cleanup, no exception) at the N-th time it
reaches MOMENT: `optimizer` (inside a step, before AdamW moves), `checkpoint` (a checkpoint's file written, the
folder not yet renamed), `final` (the same for final/), `eval` (an evaluation starting), `delta` (a delta file
written under its temporary name), `merged` (a merged model folder written under its temporary name).
"""

import os
import signal

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

if spec := os.environ.get("SPARSETUNE_TEST_KILL"):
    moment, _, count = spec.partition(":")
    reached = {"n": 0}

    def reach() -> None:
        reached["n"] += 1
        if reached["n"] == int(count):
            os.kill(os.getpid(), signal.SIGKILL)

    def after(function, when=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            if when(*args, **kwargs):
                reach()
            return result
        return wrapped

    def before(function):
        def wrapped(*args, **kwargs):
            reach()
            return function(*args, **kwargs)
        return wrapped

    import sparsetune.train as train

    if moment == "optimizer":
        import torch

        torch.optim.AdamW.step = before(torch.optim.AdamW.step)
    elif moment in ("checkpoint", "final"):
        folder = "/checkpoints/.step-" if moment == "checkpoint" else "/.final.tmp"
        train.save_file = after(train.save_file, lambda tensors, path, *a, **k: folder in str(path))
    elif moment == "eval":
        train.evaluate = before(train.evaluate)
    elif moment == "delta":
        import sparsetune.sparse.delta as delta

        delta.save_file = after(delta.save_file)
    elif moment == "merged":
        from transformers import PreTrainedModel

        PreTrainedModel.save_pretrained = after(PreTrainedModel.save_pretrained)
