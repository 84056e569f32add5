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
    python scripts/bench.py --switch --model minilm-l6      # predict: switching tasks on one loaded base
    python scripts/bench.py --rss --checkout /tmp/before --checkout .   # resident memory of whole training runs
    python scripts/bench.py --packing --model smollm2-135m --batch-size 4 --seq-len 512   # task.packing's tokens/s

With --nproc N each method runs on N ranks under torchrun (gloo on CPUs, nccl on GPUs), each rank at --batch-size,
through sparsetune's own DDP wrapper; `allreduce_bytes_per_step` is what its communication hook sent, and memory
and time are rank 0's.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    parser.add_argument("--switch", action="store_true", help="train two tasks briefly per method (sift, zeroing at "
                        "--budget; lora), then time switching between them on one loaded base against PEFT's "
                        "set_adapter and loading each merged model, and check the outputs are the merged model's")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data",
                        help="--switch, --rss, --packing: the shared data folder (glue/, instruct/)")
    parser.add_argument("--rss", action="store_true", help="resident memory of `sparsetune train` runs (the quick "
                        "start; SST-2 SIFT at batch 32 x 64, 200 steps), sampled as they train, in each --checkout")
    parser.add_argument("--checkout", type=Path, action="append", help="--rss: a sparsetune checkout to run from "
                        "(repeat to compare commits in one run; default: this one)")
    parser.add_argument("--jobs", default="quickstart,sst2", help="--rss: comma-separated subset of quickstart,sst2,sst2-lean (train.host_memory=lean; a checkout "
                        "from before the key fails it)")
    parser.add_argument("--packing", action="store_true", help="training tokens per second on the Alpaca data "
                        "with task.packing against without (--model, --batch-size rows of --seq-len, --steps)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _train_settings(args: argparse.Namespace) -> dict:
    return {"batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,  # IST scores in batch chunks
            "gradient_checkpointing": args.gradient_checkpointing}


def _load(args: argparse.Namespace):
    """(LoadedModel, causal): the pretrained --model, or a --config model with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsetune.models import LoadedModel, load_model

    if args.config:
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[args.config]))
        return LoadedModel(model, SimpleNamespace(pad_token_id=0), frozenset(n for n, _ in model.named_parameters())), True
    head = _head(args.model)
    return load_model(args.model, head), head.kind == "causal-lm"


def _head(model: str):
    """The head the bench puts on `model`: its own LM head for a causal LM, else a 2-class classifier (as SST-2)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from sparsetune.models import HeadSpec, resolve

    architecture = (AutoConfig.from_pretrained(resolve(model), trust_remote_code=False).architectures or [""])[0]
    causal = architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    return HeadSpec("causal-lm") if causal else HeadSpec("sequence-classification", 2)


def _setup(args: argparse.Namespace, method: str):
    """Build `method` through sparsetune's own code; returns (model, params, before_step, after_step, batch).

    IST rows run the real per-step sampling and, every 10 steps, a real scoring round on copies of the batch.
    """
    import torch

    from sparsetune.data import Split
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
        train = Split.from_columns("train", {"input_ids": ids.tolist() * 16,
                                             "attention_mask": [[1] * args.seq_len] * (16 * args.batch_size),
                                             "labels": labels.tolist() * 16})
        data = SimpleNamespace(train=train)  # warm-up batches from the bench batch
        staged = getattr(chosen, "base", chosen)  # IST times its own sampling, not its warm-up
        staged.placement.place(model)  # the stages compute on the device too; the wrapped model is placed again
        for stage in staged.stages:
            getattr(staged, stage)(loaded, data, run)
        model = chosen._wrap(loaded, run) if method.startswith("ist") else chosen.prepare(loaded, run)
        pad_id = loaded.tokenizer.pad_token_id
        before_step = lambda step: chosen.before_step(model, step, train, pad_id)  # noqa: E731
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


def _median_ms(fn, repeats: int, device) -> float:
    """Median milliseconds of `repeats` calls of `fn`, each fenced by a device sync."""
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


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
                    fn()  # untimed: the first call allocates
                    timed[name] = _median_ms(fn, max(3, args.steps), device)
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


SWITCH_TASKS = {"causal": [("instruct", 0), ("instruct", 1)], "classifier": [("sst2", 0), ("cola", 0)]}


def _switch_runs(args: argparse.Namespace, causal: bool, root: Path) -> dict[str, list[Path]]:
    """Per method, two tasks trained for 2 steps through the CLI, exported in the method's own format and merged:
    real masks at the real budget (switching cost depends on where the entries are, not on how well they train)."""
    methods = {"sift": {"name": "sift", "budget": args.budget, "warmup_batches": 2},
               "zeroing": {"name": "zeroing", "budget": args.budget, "warmup_batches": 2, "criticality": "grad_norm"},
               "lora": {"name": "lora", "r": 8}}
    exported: dict[str, list[Path]] = {}
    for method, settings in methods.items():
        for task, seed in SWITCH_TASKS["causal" if causal else "classifier"]:
            name = f"{method}-{task}-{seed}"
            data = ({"data_file": str(args.data / "instruct" / "alpaca_en_demo.json"), "generations": 0} if causal
                    else {"data_dir": str(args.data / "glue")})
            recipe = root / f"{name}.yaml"
            recipe.write_text(json.dumps({
                "output_dir": str(root / name), "seed": seed, "model": {"name": args.model, "max_length": args.seq_len},
                "task": {"name": task, "train_limit": 64, "eval_limit": 8} | data, "method": settings,
                "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "eval_batch_size": 8}}))
            out = root / (name if method == "lora" else f"{name}.safetensors")
            for cmd in (["train", str(recipe)], ["export-delta", str(root / name), "-o", str(out)],
                        ["apply-delta", str(out), "-o", str(root / f"{name}.merged")]):
                done = subprocess.run([sys.executable, "-m", "sparsetune", *cmd], capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"error: {' '.join(cmd[:2])} failed:\n{done.stderr[-2000:]}")
            exported.setdefault(method, []).append(out)
            print(f"{name}: trained, exported, merged", file=sys.stderr)
    return exported


def switching(args: argparse.Namespace) -> list[dict]:
    """Milliseconds to switch tasks on a loaded base, per method, against loading a merged model, with a check
    that the switched model's logits equal the merged model's exactly."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from sparsetune.device import Placement
    from sparsetune.models import load_model
    from sparsetune.predict import TaskBank, open_sources

    placement = Placement.from_config(SimpleNamespace(**_train_settings(args)))
    head = _head(args.model)
    causal = head.kind == "causal-lm"
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    root = Path(tempfile.mkdtemp(prefix="sparsetune-switch-"))
    runs = _switch_runs(args, causal, root)  # removed at the end: runs, deltas and merged copies of the model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (4, 32), generator=gen)
    batch = placement.batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def logits(model):
        with torch.no_grad(), placement.autocast():
            return model(**batch).logits.float()

    def load_merged(path: Path):
        return placement.place(auto.from_pretrained(path.with_name(f"{path.name.removesuffix('.safetensors')}.merged"),
                                                   trust_remote_code=False)
                               .requires_grad_(False).eval())

    first_ms = _median_ms(lambda: load_merged(runs["sift"][0]), 1, placement.device)  # this process's first load
    merged_ms = _median_ms(lambda: load_merged(runs["sift"][1]), 3, placement.device)  # loads after it: warm
    rows = []
    for method, paths in runs.items():
        sources = open_sources([str(p) for p in paths])
        bank = TaskBank(load_model(args.model, head), sources, placement)
        names = list(sources)
        bank.use(names[0])
        cycle = iter(names * 20)
        switch_ms = _median_ms(lambda: bank.use(next(cycle)), 2 * len(names) * 5, placement.device)
        identical = True
        for name, path in zip(names, paths):
            bank.use(name)
            identical &= torch.equal(logits(bank.model), logits(load_merged(path)))
        kept = [t for task in bank.sparse.values() for entry in task.values() for t in entry] + \
            [t for task in bank.dense.values() for t in task.values()]
        row = {"model": args.model, "method": method, "switch": "in place", "switch_ms": switch_ms,
               "merged_load_ms": merged_ms, "merged_first_load_ms": first_ms, "ratio": switch_ms / merged_ms,
               "identical_to_merged": identical,
               "sparse_entries_per_task": sum(i.numel() for t in bank.sparse.values() for i, _, _ in t.values()) // len(names),
               "dense_values_per_task": sum(t.numel() for task in bank.dense.values() for t in task.values()) // len(names),
               "memory_per_task_bytes": sum(t.numel() * t.element_size() for t in kept) // len(names)}
        rows.append(row)
        if method == "lora":  # PEFT's own way: both adapters loaded unmerged, set_adapter between them
            base = placement.place(load_model(args.model, head).model.requires_grad_(False).eval())
            peft = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a")
            peft.load_adapter(str(paths[1]), adapter_name="b")
            placement.place(peft)
            cycle = iter(["b", "a"] * 20)
            peft_ms = _median_ms(lambda: peft.set_adapter(next(cycle)), 10, placement.device)
            peft.set_adapter("a")
            adapter = [p for n, p in peft.named_parameters() if n.endswith((".a.weight", ".b.weight", ".a.bias", ".b.bias"))]
            rows.append(row | {"switch": "PEFT set_adapter", "switch_ms": peft_ms, "ratio": peft_ms / merged_ms,
                               "identical_to_merged": bool(torch.equal(logits(peft), logits(load_merged(paths[0])))),
                               "sparse_entries_per_task": 0, "dense_values_per_task": 0,
                               "memory_per_task_bytes": sum(p.numel() * p.element_size() for p in adapter) // 2})
    print(f"\n{args.model}, {placement.device_name()} ({placement.device}), {args.dtype}: switching between two "
          f"tasks on one loaded base. Loading a merged model (from_pretrained): {first_ms:.0f} ms the first time in "
          f"a process, {merged_ms:.0f} ms (median of 3) after that\n")
    print("| method | switch | entries per task | kept per task (MB) | switch (ms) | / merged load | / first load "
          "| logits = merged |")
    print("|---|---|---:|---:|---:|---:|---:|:-:|")
    for r in rows:
        entries = f"{r['sparse_entries_per_task']:,} sparse" + (f" + {r['dense_values_per_task']:,} dense"
                                                                 if r["dense_values_per_task"] else "")
        print(f"| {r['method']} | {r['switch']} | {entries} | {r['memory_per_task_bytes'] / 1e6:,.1f} | "
              f"{r['switch_ms']:.3f} | 1/{merged_ms / r['switch_ms']:,.0f} | 1/{first_ms / r['switch_ms']:,.0f} | "
              f"{'yes' if r['identical_to_merged'] else 'no'} |")
    shutil.rmtree(root)
    return rows


def _rss_jobs(args: argparse.Namespace) -> dict[str, list[str]]:
    sst2 = args.data / "glue" / "SST-2"
    job = ["recipes/glue/sst2-sift.yaml", f"task.data_dir={sst2}", "model.max_length=64", "train.batch_size=32",
           "train.max_steps=200", "train.eval_every=200", "train.log_every=10"]
    return {"quickstart": ["recipes/quickstart.yaml"], "sst2": job, "sst2-lean": [*job, "train.host_memory=lean"]}


def _status_kib(pid: int, field: str) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")), None)


def rss_profile(args: argparse.Namespace) -> list[dict]:
    """Peak RSS of whole `sparsetune train` runs (loading, warm-up, selection, training, evaluation) and the RSS at
    each logged training step, polled from /proc every 50 ms: the peak is what a user must have free, and the
    first-to-last logged step is whether training itself holds on to more as it goes."""
    jobs = _rss_jobs(args)
    rows = []
    for checkout in args.checkout or [Path(__file__).resolve().parents[1]]:
        for job in args.jobs.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                run = Path(tmp) / "run"
                cmd = [sys.executable, "-m", "sparsetune", "train", *jobs[job], f"output_dir={run}", "--force"]
                started = time.perf_counter()
                proc = subprocess.Popen(cmd, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                peak, by_step, rates, seen = 0, {}, [], 0
                while proc.poll() is None:
                    peak = max(peak, _status_kib(proc.pid, "VmHWM") or 0)
                    metrics = run / "metrics.jsonl"
                    lines = metrics.read_text().splitlines() if metrics.is_file() else []
                    for line in lines[seen:]:
                        step = json.loads(line)
                        if "loss" in step:
                            by_step[step["step"]] = _status_kib(proc.pid, "VmRSS") or 0
                            rates.append(step["examples_per_s"])
                    seen = len(lines)
                    time.sleep(0.05)
                if proc.returncode != 0:
                    sys.exit(f"error: {job} in {checkout} failed:\n{proc.stderr.read()[-2000:]}")
                results = json.loads((run / "eval" / "results.json").read_text())
                steps = sorted(by_step)
                rows.append({"checkout": str(checkout), "job": job, "peak_rss_mib": round(peak / 1024),
                             "first_logged_step": steps[0], "rss_first_mib": round(by_step[steps[0]] / 1024),
                             "last_logged_step": steps[-1], "rss_last_mib": round(by_step[steps[-1]] / 1024),
                             "wall_s": round(time.perf_counter() - started, 1), "metrics": results["metrics"],
                             "median_examples_per_s": round(statistics.median(rates[1:] or rates), 1)})
                r = rows[-1]
                print(f"{checkout} {job}: peak {r['peak_rss_mib']:,} MiB; step {r['first_logged_step']} "
                      f"{r['rss_first_mib']:,} MiB -> step {r['last_logged_step']} {r['rss_last_mib']:,} MiB; "
                      f"{r['wall_s']} s", file=sys.stderr)
    print("\n| checkout | run | peak RSS (MiB) | RSS at first logged step | at last | training examples/s (median) "
          "| wall (s) | dev metrics |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
        print(f"| {r['checkout']} | {r['job']} | {r['peak_rss_mib']:,} | {r['rss_first_mib']:,} (step "
              f"{r['first_logged_step']}) | {r['rss_last_mib']:,} (step {r['last_logged_step']}) | "
              f"{r['median_examples_per_s']} | {r['wall_s']} | "
              f"{metrics} |")
    return rows


def packing_throughput(args: argparse.Namespace) -> list[dict]:
    """Tokens (not padding) trained per second through `sparsetune train` with and without task.packing, LoRA on
    the 52k Alpaca records: the median of per-step rates after 2 untimed steps, in one process each. Unpacked
    batches pad every row to the longest; packed rows are full, so the same compute trains more tokens."""
    data = args.data / "instruct" / "alpaca_52k_en.json.gz"
    rows = []
    for packing in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            steps = args.steps + 2
            cmd = [sys.executable, "-m", "sparsetune", "train", "recipes/instruct/alpaca-lora.yaml",
                   f"model.name={args.model}", f"model.max_length={args.seq_len}", f"task.data_file={data}",
                   f"task.packing={str(packing).lower()}", "task.eval_limit=16", "task.generations=0",
                   f"train.batch_size={args.batch_size}", "train.grad_accum=1", f"train.max_steps={steps}",
                   f"train.eval_every={steps}", "train.log_every=1", f"train.device={args.device}",
                   f"train.dtype={args.dtype}", f"output_dir={run}"]
            done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"error: packing={packing} failed:\n{done.stderr[-2000:]}")
            logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            timed = [r for r in logged if "tokens_per_s" in r and r["step"] > 2]
            rows.append({"packing": packing, "model": args.model, "rows_per_batch": args.batch_size,
                         "max_length": args.seq_len, "steps_timed": len(timed),
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                         "rows_per_s": statistics.median(r["examples_per_s"] for r in timed),
                         "heldout_loss": json.loads((run / "eval" / "results.json").read_text())["metrics"]["loss"]})
            print(f"packing={packing}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    plain, packed = rows
    print(f"\n{args.model}, LoRA, {args.batch_size} rows of up to {args.seq_len} tokens, Alpaca 52k\n")
    print("| task.packing | tokens/s (median step) | rows/s | held-out loss after the steps |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {str(r['packing']).lower()} | {r['tokens_per_s']:,.0f} | {r['rows_per_s']:.2f} | {r['heldout_loss']:.4f} |")
    print(f"\npacked / unpacked tokens per second: {packed['tokens_per_s'] / plain['tokens_per_s']:.2f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        if row := run_child(args):
            print(json.dumps(row))
        return
    modes = {"crossover": crossover, "switch": switching, "rss": rss_profile, "packing": packing_throughput}
    if chosen := [mode for mode in modes if getattr(args, mode)]:
        rows = modes[chosen[0]](args)
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
