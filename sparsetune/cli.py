"""The `sparsetune` command line: thin commands over the recipe, run directory, training and export."""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from sparsetune.console import log, out
from sparsetune.distributed import EXIT_PEER, claim_failure, init, main_rank_prints, shutdown, world
from sparsetune.errors import UserError, unknown

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Sparse fine-tuning of pretrained language models from YAML recipes.")
recipes_app = typer.Typer(no_args_is_help=True, help="List, show and copy the shipped recipes.")
app.add_typer(recipes_app, name="recipes")

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. train.lr=2e-4")]
RunArg = Annotated[Path, typer.Argument(help="run directory (the recipe's output_dir)")]
Force = Annotated[bool, typer.Option("--force", help="recompute even when a result exists")]
Checkpoint = Annotated[str, typer.Option(help="'final' or a checkpoint folder name such as step-100")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps; default: the run's train.device")]


def _load(recipe_path: Path, overrides: list[str] | None):
    from sparsetune.device import Placement
    from sparsetune.recipe import load_recipe
    from sparsetune.rundir import RunDir

    recipe = load_recipe(recipe_path, overrides or [])
    Placement.from_config(recipe.train)  # a device or dtype this machine lacks fails before anything is written
    return recipe, RunDir(recipe.output_dir)


def _run_stage(stage: str, recipe, run, force: bool, explicit: bool = True) -> None:
    """Run warm-up or selection when the method has it and its saved result is missing or --force."""
    from sparsetune.device import trim_host_memory
    from sparsetune.methods import method_class
    from sparsetune.train import build

    method_cls = method_class(recipe.method.name)
    if stage not in method_cls.stages:
        if explicit:
            log.print(f"{stage}: method '{recipe.method.name}' has no {stage} stage; nothing to do")
        return
    fingerprint = method_cls(recipe).stage_fingerprint(stage)
    if not force and run.check_stage(stage, fingerprint, world().size):
        log.print(f"{stage}: up to date in {run.stage_dir(stage)}")
        return
    log.print(f"{stage}: running for method '{recipe.method.name}'")
    started = time.perf_counter()
    session = build(recipe, run, with_data=stage == "warmup", prepare=False)  # selection reads only scores
    summary = getattr(session.method, stage)(session.loaded, session.data, run)
    run.record_stage(stage, fingerprint, summary=summary, wall_time_s=round(time.perf_counter() - started, 2),
                     **session.placement.record(), world_size=world().size)
    del session
    trim_host_memory()  # the stage's model and gradients are gone: give their memory back before training
    world().barrier()  # the other ranks read what rank 0 wrote
    log.print(f"{stage}: {summary}")


@app.command()
def train(
    recipe_path: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest complete checkpoint")] = False,
    force: Annotated[bool, typer.Option("--force", help="delete earlier training outputs and start over")] = False,
    stop_at_step: Annotated[Optional[int], typer.Option(min=1, help="checkpoint and stop after this step")] = None,
    nproc: Annotated[Optional[int], typer.Option(min=1, help="train data-parallel on this many local processes (one "
                                                 "per GPU, or CPU processes with gloo), as torchrun --nproc_per_node")] = None,
) -> None:
    """Run warm-up and selection when missing, train, then evaluate on the dev split(s)."""
    from sparsetune.distributed import launch
    from sparsetune.train import train_run

    recipe, run = _load(recipe_path, overrides)
    if nproc is not None:
        if world().launched:
            raise UserError("--nproc: this process was started by torchrun already; drop --nproc")
        flags = ["--resume"] * resume + ["--force"] * force + (["--stop-at-step", str(stop_at_step)] if stop_at_step else [])
        sys.exit(launch(nproc, ["train", str(recipe_path), *(overrides or []), *flags]))
    if run.has_training_outputs():
        if force:
            run.clear_training_outputs()
        elif not resume:
            raise UserError(f"output_dir '{run.root}' already holds a training run; pass --resume to continue "
                            "or --force to start over")
    run.open(recipe)
    for stage in ("warmup", "select"):
        _run_stage(stage, recipe, run, force=force, explicit=False)
    results = train_run(recipe, run, log, resume, stop_at_step)
    world().barrier()  # every rank ends once rank 0 has written final/ and eval/
    if results:
        _print_results(results, run)


def _print_results(results: dict, run) -> None:
    metrics = " ".join(f"{k}={v:.4f}" for k, v in results["metrics"].items())
    out.print(f"{results['task']} {'/'.join(results['splits'])}: {metrics}")
    out.print(f"results: {run.eval_dir / 'results.json'}")


@app.command()
def warmup(recipe_path: RecipeArg, overrides: Overrides = None, force: Force = False) -> None:
    """Warm-up stage: score what the method may train (writes warmup/)."""
    recipe, run = _load(recipe_path, overrides)
    run.open(recipe)
    _run_stage("warmup", recipe, run, force)


@app.command("select")
def select_(recipe_path: RecipeArg, overrides: Overrides = None, force: Force = False) -> None:
    """Selection stage: choose the trained entries from the warm-up scores (writes mask/)."""
    recipe, run = _load(recipe_path, overrides)
    run.open(recipe)
    _run_stage("select", recipe, run, force)


@app.command("eval")
def eval_(run_dir: RunArg, checkpoint: Checkpoint = "final", device: Device = None) -> None:
    """Score a run on its dev split(s): eval/results.json and eval/predictions.jsonl."""
    from sparsetune.rundir import RunDir
    from sparsetune.train import restore, write_eval

    run = RunDir(run_dir)
    results = write_eval(run, restore(run, checkpoint, device=device), checkpoint)
    _print_results(results, run)


@app.command("export-delta")
def export_delta(
    run_dir: RunArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="file (delta) or folder (merged, peft) to write")],
    fmt: Annotated[str, typer.Option("--format", help="auto (the method's own), delta, merged or peft")] = "auto",
    checkpoint: Checkpoint = "final",
    device: Device = None,
    values: Annotated[str, typer.Option(help="dtype of a delta's sparse values: fp32 (exact) or bf16 (half the "
                                        "bytes; the header records the largest error)")] = "fp32",
) -> None:
    """Write the tuned task as a delta over the base model (or a merged model / PEFT adapter)."""
    from sparsetune.methods.base import EXPORT_FORMATS
    from sparsetune.rundir import RunDir
    from sparsetune.train import export_run

    if fmt not in EXPORT_FORMATS:
        raise unknown("--format", fmt, EXPORT_FORMATS)
    if values not in ("fp32", "bf16"):
        raise unknown("--values", values, ("fp32", "bf16"))
    size = export_run(RunDir(run_dir), output, fmt, checkpoint, device, values)
    out.print(f"wrote {output} ({size:,} bytes)")


@app.command("apply-delta")
def apply_delta(
    delta: Annotated[Path, typer.Argument(help="delta file or PEFT adapter folder written by export-delta")],
    output: Annotated[Path, typer.Option("-o", "--output", help="folder for the merged Hugging Face model")],
    base: Annotated[Optional[str], typer.Option(help="base model; default: the one recorded in the delta")] = None,
    device: Annotated[str, typer.Option(help="where to merge: cpu, cuda, cuda:N or mps")] = "cpu",
) -> None:
    """Turn the base model plus a delta into a merged model folder that from_pretrained loads."""
    from sparsetune.device import resolve_device
    from sparsetune.peft_adapter import apply_adapter, read_adapter_meta
    from sparsetune.models import HeadSpec, load_model
    from sparsetune.rundir import atomic_path
    from sparsetune.sparse.delta import apply_delta as apply_to, read_delta

    adapter = delta.is_dir()
    tensors, meta = (None, read_adapter_meta(delta)) if adapter else read_delta(delta)
    loaded = load_model(base or meta["base_model"], HeadSpec(**meta["head"]))
    loaded.model.to(resolve_device(device))
    if adapter:
        model = apply_adapter(loaded.model, delta, meta)
    else:
        apply_to(loaded.model, tensors, meta)
        model = loaded.model
    with atomic_path(output) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    out.print(f"wrote {output}")


@app.command()
def predict(
    delta: Annotated[list[str], typer.Option("--delta", help="delta file or PEFT adapter folder from export-delta, "
                                             "as PATH or NAME=PATH (default name: the file's stem); repeat for more tasks")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="texts to predict (instructions for a causal LM)")] = None,
    input_path: Annotated[Optional[str], typer.Option("--input", help="JSONL, TSV (with a header) or text file; "
                                                      "- reads stdin")] = None,
    input_format: Annotated[str, typer.Option(help="auto (by suffix; stdin: JSONL if it starts with '{'), jsonl, "
                                              "tsv or text")] = "auto",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="JSONL file to write; default stdout")] = None,
    base: Annotated[Optional[str], typer.Option(help="base model; default: the one the deltas record")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="the base's dtype: fp32, bf16 or fp16")] = "fp32",
    batch_size: Annotated[int, typer.Option(min=1, help="inputs per forward pass")] = 32,
    max_length: Annotated[Optional[int], typer.Option(min=1, help="tokens per input; default: the delta's "
                                                      "training max_length")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per instruction")] = 64,
) -> None:
    """Predict with one or more tasks over one loaded base, switching tasks in place (rows may name a `task`;
    rows that name none go to every task)."""
    import json
    import statistics

    from sparsetune.device import DTYPES, Placement, check_dtype, resolve_device
    from sparsetune.models import load_model
    from sparsetune.predict import TaskBank, base_model_name, open_sources, plan, predict as run_predict, read_rows
    from sparsetune.rundir import atomic_path

    if dtype not in DTYPES:
        raise unknown("--dtype", dtype, DTYPES)
    if output is not None and output.is_dir():
        raise UserError(f"-o: '{output}' is a folder; expected a JSONL file name")
    sources = open_sources(delta)
    jobs = plan(read_rows(texts or [], input_path, input_format), sources)
    where = resolve_device(device)
    placement = Placement(where, check_dtype(where, dtype))
    first = next(iter(sources.values()))
    loaded = load_model(base_model_name(sources, base), first.head)
    bank = TaskBank(loaded, sources, placement)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in run_predict(bank, sources, jobs, batch_size,
                                                                          max_new_tokens, max_length)]
    if output is None:
        sys.stdout.writelines(lines)
    else:
        with atomic_path(output) as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")
    switches = bank.switch_seconds
    median = f", median switch {1e3 * statistics.median(switches):.2f} ms" if switches else ""
    log.print(f"predict: {len(lines)} predictions from {len(sources)} task(s) on one {placement.device} base, "
              f"{len(switches)} switch(es) in place{median}" + (f"; wrote {output}" if output else ""))


@app.command()
def report(
    run_dirs: Annotated[list[str], typer.Argument(help="run directories or globs, e.g. 'runs/glue/*'")],
    output: Annotated[Path, typer.Option("-o", "--output", help="folder for report.md and the PNG plots")],
    measure_deltas: Annotated[bool, typer.Option("--measure-deltas/--no-measure-deltas",
                                                 help="export runs whose delta size is not recorded yet")] = True,
) -> None:
    """Compare runs side by side: a markdown table per task and plots (loss, dev metric, entries, IST, budget)."""
    from sparsetune.report import build_report, expand

    path = build_report(expand(run_dirs), output, measure_deltas)
    out.print(f"wrote {path}")


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="sweep YAML: output_root, recipes, overrides, grid, seeds, "
                                               "lr_selection")],
    jobs: Annotated[int, typer.Option(min=1, help="points trained at once (one GPU each where there are several)")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the points and their state; run nothing")] = False,
    measure_deltas: Annotated[bool, typer.Option("--measure-deltas/--no-measure-deltas",
                                                 help="export runs in the report whose delta size is not recorded")] = False,
) -> None:
    """Train every point of a grid (recipes x overrides x seeds) as its own run directory, skipping complete
    points and resuming interrupted ones, then write `<output_root>/report/report.md`."""
    from sparsetune.sweep import run_sweep

    missing = run_sweep(sweep_file, jobs, dry_run, measure_deltas)
    if missing:
        log.print(f"sweep: {missing} point(s) not complete; their logs are in the sweep's logs/ folder. Run the "
                  "sweep again to resume them")
        sys.exit(1)


@app.command()
def validate(recipe_path: RecipeArg, overrides: Overrides = None) -> None:
    """Print the resolved recipe and the trainable-parameter count, without training."""
    from sparsetune.data import task_spec
    from sparsetune.methods import method_class
    from sparsetune.models import HeadSpec, load_model

    recipe, _ = _load(recipe_path, overrides)
    out.print(recipe.to_yaml(), end="", markup=False, highlight=False)
    loaded = load_model(recipe.model.name, HeadSpec.for_task(task_spec(recipe.task.name)), recipe.model.trust_remote_code)
    out.print(f"# {method_class(recipe.method.name)(recipe).describe(loaded)}", markup=False, highlight=False)


@recipes_app.command("ls")
def recipes_ls() -> None:
    """List the shipped recipes."""
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        out.print(str(path.relative_to(RECIPES_DIR).with_suffix("")))


def _shipped(name: str) -> Path:
    path = RECIPES_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        names = [str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml")]
        raise unknown("recipe", name, names)
    return path


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="e.g. glue/sst2-full")]) -> None:
    """Print a shipped recipe."""
    out.print(_shipped(name).read_text(), end="", markup=False, highlight=False)


@recipes_app.command("cp")
def recipes_cp(name: Annotated[str, typer.Argument(help="e.g. glue/sst2-full")],
               dest: Annotated[Path, typer.Argument(help="file or folder to copy it to")]) -> None:
    """Copy a shipped recipe to edit it."""
    target = dest / _shipped(name).name if dest.is_dir() else dest
    shutil.copyfile(_shipped(name), target)
    out.print(f"wrote {target}")


DISTRIBUTED_COMMANDS = ("train", "warmup", "select", "eval")  # what runs under torchrun with several ranks
INTERRUPTED = "interrupted; continue with --resume"


def main(argv: list[str] | None = None) -> None:
    """The entry point. Under torchrun every rank runs it; the first rank that fails prints one error line, the
    others stop quietly (exit code 3), and rank 0 alone prints the rest."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices are not for users
    args = sys.argv[1:] if argv is None else argv
    ranks = init()
    try:
        with main_rank_prints(log, out):
            if ranks.size > 1 and args and args[0] not in DISTRIBUTED_COMMANDS:
                raise UserError(f"`sparsetune {args[0]}` runs on one process; start it without torchrun")
            code = app(args=args, prog_name="sparsetune", standalone_mode=False)  # errors come here, to report once
    except UserError as exc:
        _fail(f"error: {exc}", 2, exc)
    except typer.Abort:
        _fail(INTERRUPTED, 130)
    except TyperException as exc:  # usage errors (a missing argument, an option out of range), in click's words
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(f"error: {message}", getattr(exc, "exit_code", 2))
    except OSError as exc:  # the file system refused (permissions, a full disk): name the file, no traceback
        _fail(f"error: {exc.filename or 'a file'}: {exc.strerror or exc}", 2, exc)
    except Exception as exc:
        if not ranks.launched:
            raise
        # a peer's failure surfaces here as a broken collective; it has reported, so this rank stays quiet
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(f"error: rank {ranks.rank}: {type(exc).__name__}: {first}", 1, exc)
    if code == 130:  # typer's answer to Ctrl-C
        _fail(INTERRUPTED, 130)
    shutdown()
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    """Print `message` and exit with `code` if this rank is the first to fail; otherwise exit quietly."""
    if not claim_failure():
        sys.exit(EXIT_PEER)
    log.print(message, markup=False, highlight=False, soft_wrap=True)
    if exc is not None and not isinstance(exc, UserError) and world().launched:
        ErrorHandler().record_exception(exc)  # torchrun's report then carries the traceback
    sys.exit(code)
