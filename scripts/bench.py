"""Peak memory and median step time of one training step per method, each method in its own process.

Same model, batch and trainable count for every method: LoRA and SHiRA get the rank whose trainable count
matches SIFT's budget. `frozen` is the floor: forward + backward through the same model with nothing to
update. On CPU the memory is the process's peak RSS during the steps (the high-water mark is reset after
loading through /proc/self/clear_refs, so loading transients do not count); on a GPU, max_memory_allocated
(the weights included). Every method runs through sparsetune's own placement (device, dtype, checkpointing).

    python scripts/bench.py --model smollm2-135m --batch-size 1 --seq-len 128 --budget 0.008 --json bench.json
    python scripts/bench.py --device cuda --dtype bf16 --config llama-1b --batch-size 8 --seq-len 512
    python scripts/bench.py --crossover [--device cuda --dtype bf16]   # the measurements behind grad: auto
    python scripts/bench.py --nproc 2 --model minilm-l6     # data-parallel: bytes all-reduced per optimizer step

With --nproc N each method runs on N ranks under torchrun (gloo on CPUs, nccl on GPUs), each rank at --batch-size,
through sparsetune's own DDP wrapper; `allreduce_bytes_per_step` is what its communication hook sent, and memory
and time are rank 0's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

METHODS = ("frozen", "full", "lora", "shira", "sift", "sift-indexed", "sift-dense", "ist-lora", "ist-sift", "zeroing",
           "dense-critical")
SIFT_GRAD = {"sift": "auto", "sift-indexed": "indexed", "sift-dense": "dense"}  # sift's `grad` setting per row
# --config: models built from a config with random weights (memory and speed do not depend on the values)
CONFIGS = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="packaged alias, local folder or hub id")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 untimed ones)")
    parser.add_argument("--budget", type=float, default=0.008, help="SIFT budget; LoRA/SHiRA rank is matched to it")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (sparsetune's train.device)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="the frozen base's dtype")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="a Llama-shaped model with random weights "
                        "instead of --model's pretrained one")
    parser.add_argument("--crossover", action="store_true", help="time the indexed and the dense gradient of one "
                        "weight over shapes, token counts and densities (the measurements behind grad: auto)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per method (data-parallel, under torchrun)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _train_settings(args: argparse.Namespace) -> dict:
    return {"batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,  # IST scores in batch chunks
            "gradient_checkpointing": args.gradient_checkpointing}


def _load(args: argparse.Namespace):
    """(LoadedModel, causal): the pretrained --model, or a --config model with random weights."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from sparsetune.models import HeadSpec, LoadedModel, load_model, resolve

    if args.config:
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[args.config]))
        return LoadedModel(model, SimpleNamespace(pad_token_id=0), frozenset(n for n, _ in model.named_parameters())), True
    architecture = (AutoConfig.from_pretrained(resolve(args.model), trust_remote_code=False).architectures or [""])[0]
    causal = architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()  # else: a classifier, as for GLUE
    return load_model(args.model, HeadSpec("causal-lm") if causal else HeadSpec("sequence-classification", 2)), causal


def _setup(args: argparse.Namespace, method: str):
    """Build `method` through sparsetune's own code; returns (model, params, before_step, after_step, batch).

    IST rows run the real per-step sampling and, every 10 steps, a real scoring round on copies of the batch.
    """
    import torch

    from sparsetune.methods import method_class
    from sparsetune.recipe import build_recipe
    from sparsetune.rundir import RunDir

    torch.manual_seed(0)
    loaded, causal = _load(args)
    model = loaded.model

    def recipe(settings: dict):
        return build_recipe({"output_dir": tempfile.mkdtemp(prefix="sparsetune-bench-"), "model": {"name": args.model},
                             "task": {"name": "instruct" if causal else "sst2"}, "method": settings,
                             "train": _train_settings(args)})

    sift_settings = {"name": "sift", "budget": args.budget, "score": "random", "grad": SIFT_GRAD.get(method, "indexed")}
    sift = method_class("sift")(recipe(sift_settings))
    targets = sift.targets(model)
    k = sum(sift.plan(targets).values())
    shapes = [p.shape for n, p in targets.items() if n.endswith(".weight")]
    rank = max(1, round(k / sum(s[0] + s[1] for s in shapes)))
    lora_settings = {"name": "lora", "r": rank, "alpha": 2 * rank, "dropout": 0.0}

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    labels = ids if causal else torch.randint(0, 2, (args.batch_size,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    before_step = after_step = lambda *_: None  # noqa: E731
    chosen = None  # a sparsetune method, for the rows that build one
    if method == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif method == "full":
        model.requires_grad_(True)
    elif method == "shira":
        from peft import ShiraConfig, get_peft_model

        from sparsetune.models import default_targets

        model = get_peft_model(model, ShiraConfig(r=rank, target_modules=default_targets(model)))
    else:
        zeroing = {"name": "zeroing", "criticality": "grad_norm", "warmup_batches": 1}  # 5% of half the blocks
        settings = {"lora": lora_settings, "ist-lora": {"name": "ist", "base": lora_settings},
                    "ist-sift": {"name": "ist", "base": sift_settings}, "zeroing": zeroing,
                    "dense-critical": zeroing | {"mode": "dense-critical"}}.get(method, sift_settings)
        chosen = method_class(settings["name"])(recipe(settings))
        run = RunDir(chosen.recipe.output_dir, writer=True)  # each rank's own scratch run
        run.open(chosen.recipe)
        features = [{"input_ids": ids[i].tolist(), "attention_mask": [1] * args.seq_len,
                     "labels": labels[i].tolist()} for i in range(args.batch_size)] * 16
        data = SimpleNamespace(train=SimpleNamespace(features=features))  # warm-up batches from the bench batch
        staged = getattr(chosen, "base", chosen)  # IST times its own sampling, not its warm-up
        staged.placement.place(model)  # the stages compute on the device too; the wrapped model is placed again
        for stage in staged.stages:
            getattr(staged, stage)(loaded, data, run)
        model = chosen._wrap(loaded, run) if method.startswith("ist") else chosen.prepare(loaded, run)
        pad_id = loaded.tokenizer.pad_token_id
        before_step = lambda step: chosen.before_step(model, step, features, pad_id)  # noqa: E731
        after_step = lambda: chosen.after_step(model)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, before_step, after_step, batch, getattr(chosen, "partial_gradients", False)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def _peak_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_child(args: argparse.Namespace) -> dict:
    import torch

    from sparsetune.device import Placement
    from sparsetune.distributed import bytes_all_reduced, data_parallel, init

    method = args.child
    ranks = init()  # under torchrun with --nproc; one process otherwise
    placement = Placement.from_config(SimpleNamespace(**_train_settings(args)))
    model, params, before_step, after_step, batch, partial = _setup(args, method)
    placement.place(model)
    parallel = data_parallel(model, placement.device, partial) if params else model
    batch = placement.batch(batch)
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    scaler = placement.grad_scaler()
    model.train()
    if placement.device.type == "cuda":
        torch.cuda.empty_cache()
        placement.reset_peak_memory()
    else:
        _reset_peak_rss()
    times = []
    for step in range(args.steps + 2):
        _sync(placement.device)
        start = time.perf_counter()
        before_step(step)
        with placement.autocast():
            loss = parallel(**batch).loss
        scaler.scale(loss).backward()
        if optimizer:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        after_step()
        _sync(placement.device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak = placement.peak_memory_bytes() or _peak_rss_bytes()
    trainable = 0 if method == "frozen" else sum(p.numel() for p in params)
    sent = bytes_all_reduced(parallel)
    if not ranks.is_main:
        return {}
    return {"method": method, "trainable": trainable, "nproc": ranks.size,
            "allreduce_bytes_per_step": None if sent is None else round(sent / (args.steps + 2)), "peak_mem_bytes": peak, "step_time_s": statistics.median(times),
            "mean_step_time_s": statistics.mean(times), "device": str(placement.device),
            "device_name": placement.device_name(), "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing, "model": args.config or args.model,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "budget": args.budget}


CROSSOVER_SHAPES = ((384, 384), (192, 576), (576, 576), (1536, 576), (576, 1536), (2048, 2048), (8192, 2048))
CROSSOVER_TOKENS = (128, 1024, 4096)
CROSSOVER_DENSITIES = (0.001, 0.003, 0.008, 0.02, 0.05, 0.1)


def crossover(args: argparse.Namespace) -> list[dict]:
    """Median time of one weight's selected-entry gradient, indexed (SDDMM) against dense dW + gather, as the
    backward of sparsetune's SiftLinear computes them, in the run's dtype on its device."""
    import torch

    from sparsetune.device import Placement
    from sparsetune.sparse.increments import csr_pattern, sampled_weight_grad

    placement = Placement.from_config(SimpleNamespace(**_train_settings(args)))
    device, dtype = placement.device, placement.dtype
    rows = []
    for tokens in CROSSOVER_TOKENS:
        for out_f, in_f in CROSSOVER_SHAPES:
            gen = torch.Generator().manual_seed(0)
            dy = torch.randn(tokens, out_f, generator=gen).to(device, dtype)
            x = torch.randn(tokens, in_f, generator=gen).to(device, dtype)
            for density in CROSSOVER_DENSITIES:
                k = max(1, round(density * out_f * in_f))
                idx = torch.randperm(out_f * in_f, generator=gen)[:k].sort().values.to(device)
                crow, col = csr_pattern(idx // in_f, idx % in_f, out_f)
                timed = {}
                for name, fn in (("indexed", lambda: sampled_weight_grad(dy, x, crow, col)),
                                 ("dense", lambda: (dy.t() @ x).view(-1)[idx].float())):
                    fn()
                    samples = []
                    for _ in range(max(3, args.steps)):
                        _sync(device)
                        start = time.perf_counter()
                        fn()
                        _sync(device)
                        samples.append(time.perf_counter() - start)
                    timed[name] = statistics.median(samples) * 1e3
                rows.append({"tokens": tokens, "shape": [out_f, in_f], "density": density, "indexed_ms": timed["indexed"],
                             "dense_ms": timed["dense"], "device": str(device), "device_name": placement.device_name(),
                             "dtype": args.dtype})
                print(f"tokens {tokens} {out_f}x{in_f} density {density}: indexed {timed['indexed']:.3f} ms, "
                      f"dense {timed['dense']:.3f} ms", file=sys.stderr)
    print(f"\n{placement.device_name()} ({device}), {args.dtype}: ms for the gradient at the selected entries of one "
          "weight, indexed (SDDMM) / dense (dW + gather)\n")
    print("| tokens | weight | " + " | ".join(f"{100 * d:g}%" for d in CROSSOVER_DENSITIES) + " |")
    print("|---:|---|" + "---:|" * len(CROSSOVER_DENSITIES))
    for tokens in CROSSOVER_TOKENS:
        for shape in CROSSOVER_SHAPES:
            cells = [r for r in rows if r["tokens"] == tokens and tuple(r["shape"]) == shape]
            print(f"| {tokens} | {shape[0]}x{shape[1]} | " + " | ".join(
                f"{'**' if r['indexed_ms'] < r['dense_ms'] else ''}{r['indexed_ms']:.2f} / {r['dense_ms']:.2f}"
                f"{'**' if r['indexed_ms'] < r['dense_ms'] else ''}" for r in cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        if row := run_child(args):
            print(json.dumps(row))
        return
    if args.crossover:
        rows = crossover(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    rows = []
    for method in args.methods.split(","):
        if method not in METHODS:
            sys.exit(f"error: --methods: unknown method '{method}'; expected some of {', '.join(METHODS)}")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        cmd = [*(launcher if args.nproc > 1 else [sys.executable]), __file__, "--child", method, "--model", args.model, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--budget", str(args.budget),
               "--device", args.device, "--dtype", args.dtype] + (["--config", args.config] if args.config else []) \
            + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: {method} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{method}: done", file=sys.stderr)
    full = next((r for r in rows if r["method"] == "full"), None)
    first = rows[0]
    print(f"\n{args.config or args.model}, batch {args.batch_size} x {args.seq_len}"
          f"{f' per rank on {args.nproc} ranks' if args.nproc > 1 else ''}, budget {args.budget}, "
          f"{first['device_name']} ({first['device']}), base in {args.dtype}"
          f"{', activation checkpointing' if args.gradient_checkpointing else ''}\n")
    ranks = args.nproc > 1
    print("| method | trainable | peak memory (MiB) | vs full | median step (s) | vs full | mean step (s) |"
          + (" all-reduced per step | vs full |" if ranks else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if ranks else ""))
    for r in rows:
        mem_ratio = f"{r['peak_mem_bytes'] / full['peak_mem_bytes']:.2f}" if full else "-"
        time_ratio = f"{r['step_time_s'] / full['step_time_s']:.2f}" if full else "-"
        sent = r["allreduce_bytes_per_step"] or 0
        comm = (f" {sent:,} B | {100 * sent / full['allreduce_bytes_per_step']:.2f}% |"
                if ranks and full else f" {sent:,} B | - |" if ranks else "")
        print(f"| {r['method']} | {r['trainable']:,} | {r['peak_mem_bytes'] / 2**20:,.0f} | {mem_ratio} | "
              f"{r['step_time_s']:.3f} | {time_ratio} | {r['mean_step_time_s']:.3f} |" + comm)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
