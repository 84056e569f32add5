"""Recipe schema: one YAML file says everything about a run; unknown keys fail loudly."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from sparsetune.errors import UserError, did_you_mean


class Strict(BaseModel):
    """Every recipe section forbids unknown keys, so a typo never passes silently, and no number is inf or nan."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ModelConfig(Strict):
    name: str = Field("minilm-l6", description="packaged alias (minilm-l6, smollm2-135m), local folder or hub id")
    max_length: int = Field(128, gt=0, description="tokens per example after truncation")
    trust_remote_code: bool = Field(False, description="let transformers run the model folder's own Python code "
                                    "(only for a model you trust; recorded in the manifest)")


class TaskConfig(Strict):
    name: str = Field(description="GLUE task (sst2, mrpc, ...), rotten_tomatoes, or instruct")
    data_dir: Path | None = Field(None, description="GLUE folder in the official layout (train.tsv, dev.tsv)")
    data_file: Path | None = Field(None, description="instruction data: Alpaca JSON or JSONL, optionally gzipped "
                                   "(.json, .jsonl, .json.gz, .jsonl.gz)")
    train_limit: int | None = Field(None, gt=0, description="use only the first N training examples")
    eval_limit: int | None = Field(None, gt=0, description="use only the first N examples of each dev split")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share when the data has no dev split, and "
                                 "of the training data with eval_split: train_holdout")
    eval_split: Literal["dev", "train_holdout"] = Field(
        "dev", description="what evaluation scores: the dev split(s), or a held-out slice of the training data (the "
        "dev files are then never read: what a sweep's learning-rate selection uses)")
    packing: bool = Field(False, description="instruction data: several examples per training row up to "
                          "model.max_length, each attending only to itself (position ids restart per example)")
    streaming: bool = Field(False, description="instruction data: read a .jsonl(.gz) corpus as it trains, never "
                            "holding or tokenizing it whole (needs train.max_steps)")
    shuffle_buffer: int = Field(10000, gt=0, description="task.streaming: records shuffled at a time")
    generations: int = Field(4, ge=0, description="instruction data: greedy generations written at eval")
    max_new_tokens: int = Field(64, gt=0, description="instruction data: length of each generation")


class TrainConfig(Strict):
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(32, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(5e-5, gt=0)
    head_lr: float | None = Field(None, gt=0, description="learning rate of the fresh task head (a classifier's or "
                                  "regressor's output layer); default train.lr")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int | None = Field(None, gt=0, description="steps between dev evaluations; default each epoch")
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints; default each epoch")
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    host_memory: Literal["fast", "lean"] = Field(
        "fast", description="CPU memory policy: fast keeps glibc's heap (returned to the system at every log step); "
        "lean maps large tensors afresh, for a flat RSS at the working set at the cost of CPU throughput")
    loader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes that collate batches ahead of the step: auto is 2 when a "
        "GPU is fed (with pinned memory), else 0 (the CPU that would collate is the one computing)")
    device: str = Field("auto", description="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="storage and compute dtype of the frozen base; trainable tensors stay fp32")
    gradient_checkpointing: bool = Field(False, description="recompute block activations in the backward")


class MethodConfig(Strict):
    """Base of every method's settings; each method file subclasses it with its own keys."""

    name: str


class Recipe(Strict):
    output_dir: Path
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the head, the data order and every sampler")
    model: ModelConfig = ModelConfig()
    task: TaskConfig
    method: MethodConfig
    train: TrainConfig = TrainConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self, *keys: str) -> str:
        """Hash of the named sections or dotted keys (all but output_dir when none), for stale-input checks."""
        data = self.model_dump(mode="json")
        keys = keys or tuple(k for k in data if k != "output_dir")
        picked = {}
        for key in keys:
            value = data
            for part in key.split("."):
                value = value[part]
            picked[key] = value
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def with_method(self, method: MethodConfig) -> Recipe:
        """This recipe with another method section (IST runs its base method on one)."""
        return _recipe_class(type(method)).model_validate(self.model_dump(exclude={"method"}) | {"method": method})


@lru_cache(maxsize=None)
def _recipe_class(method_config: type[MethodConfig]) -> type[Recipe]:
    return create_model("Recipe", __base__=Recipe, method=(method_config, ...))


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=2e-4' -> (['train', 'lr'], 0.0002); the value is read as a YAML scalar."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{item}': expected key=value, e.g. train.lr=2e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise UserError(f"override '{item}': the value is not a YAML scalar (quote it)") from None
    if isinstance(parsed, str) and _looks_numeric(parsed):  # YAML 1.1 reads 2e-4 as a string
        parsed = float(parsed)
    return key.strip().split("."), parsed


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted key. A section given by its name alone (`method.base=sift`) is the section {name: sift}:
    dotted keys under it (`method.base.budget=0.03`) then set its fields, and naming the section's own method
    again keeps the recipe's settings for it."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if isinstance(child, str):
                child = node[part] = {"name": child}
            if not isinstance(child, dict):
                raise UserError(f"override '{item}': '{part}' is not a section")
            node = child
        current = node.get(path[-1])
        if isinstance(value, str) and isinstance(current, dict) and "name" in current:
            node[path[-1]] = current if current["name"] == value else {"name": value}
        else:
            node[path[-1]] = value
    return raw


def _section_fields(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the section that `loc` points into (for did-you-mean)."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        sub = getattr(field, "annotation", None) if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        cls = sub
    return list(cls.model_fields)


def _format_error(err: dict, cls: type[BaseModel], source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{did_you_mean(loc[-1], _section_fields(cls, loc))}"
    if err["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    return f"{source}: {key}: {err['msg']} (got {err.get('input')!r})"


def build_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a raw mapping into the Recipe whose `method` is the named method's own config."""
    from sparsetune.data import task_spec
    from sparsetune.methods import method_class  # both import this module, so import late

    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections (model, task, method, train)")
    method_raw = raw.get("method")
    if not isinstance(method_raw, dict) or "name" not in method_raw:
        raise UserError(f"{source}: missing required key 'method.name'")
    cls = _recipe_class(method_class(str(method_raw["name"])).Config)
    try:
        recipe = cls.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_error(exc.errors()[0], cls, source)) from None
    task_spec(recipe.task.name)  # unknown task names fail here, before any model is loaded
    return recipe


def load_recipe(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file (byte {exc.start} is not UTF-8); expected a YAML recipe") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    recipe = build_recipe(apply_overrides(raw, overrides or []), str(path))
    return absolute_paths(recipe)


def absolute_paths(recipe: Recipe) -> Recipe:
    """Local paths become absolute, so the saved recipe works from any directory (eval, export)."""
    task = recipe.task
    updates = {k: getattr(task, k).resolve() for k in ("data_dir", "data_file") if getattr(task, k) is not None}
    model = recipe.model
    if Path(model.name).exists():
        model = model.model_copy(update={"name": str(Path(model.name).resolve())})
    return recipe.model_copy(update={"task": task.model_copy(update=updates), "model": model})

