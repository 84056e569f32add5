"""Bad input through the real CLI: one `error:` line naming the key or file, exit code 2, no traceback, and
nothing left behind that looks complete. Plus the damaged-checkpoint fallback, and the security rules."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from sparsetune.sparse.delta import read_delta

from conftest import run_cli, write_recipe
from test_methods import losses

SOURCES = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, glue_root) -> dict[str, Path]:
    """One finished SIFT run on the tiny BERT (checkpoints at steps 2 and 4... kept), and its exported delta."""
    root = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(root / "recipe.yaml", output_dir=str(root / "run"), seed=0,
                          model={"name": str(tiny_bert), "max_length": 32},
                          task={"name": "sst2", "data_dir": str(glue_root)},
                          method={"name": "sift", "budget": 0.05, "warmup_batches": 2},
                          train={"max_steps": 6, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 2,
                                 "keep_checkpoints": 2, "eval_batch_size": 8})
    assert run_cli("train", recipe) == 0
    assert run_cli("export-delta", root / "run", "-o", root / "delta.safetensors") == 0
    return {"recipe": recipe, "run": root / "run", "delta": root / "delta.safetensors"}


def tampered_delta(trained, tmp_path: Path, change) -> Path:
    """The trained delta's entries with `change(tensors)` applied, written as a version-1 file (plain int
    indices, which any malformed index set can be)."""
    with safe_open(str(trained["delta"]), framework="pt") as handle:
        metadata = handle.metadata()
    tensors, _ = read_delta(trained["delta"])
    change(tensors)
    path = tmp_path / "bad-delta.safetensors"
    save_file(tensors, str(path), metadata=metadata | {"version": "1"})
    return path


def first(tensors: dict, kind: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(f".{kind}"))


def _set(tensors, key, value):
    tensors[key] = value


# case name -> builder(ctx) returning (cli args, text the error line must name, a path that must not appear)
CASES = {
    # --- the recipe and the command line ---
    "recipe file missing": lambda c: (["train", c.tmp / "nope.yaml"], "nope.yaml", None),
    "recipe not text": lambda c: (["train", c.write_bytes("bin.yaml", b"\xff\xfe\x00garbage\x81")], "bin.yaml", None),
    "recipe not YAML": lambda c: (["train", c.write_bytes("bad.yaml", b"model: [unclosed")], "bad.yaml", None),
    "recipe is a list": lambda c: (["train", c.write_bytes("list.yaml", b"- a\n- b\n")], "list.yaml", None),
    "method.name missing": lambda c: (["train", c.recipe(method={"budget": 0.1})], "method.name", c.final),
    "unknown method": lambda c: (["train", c.recipe(method={"name": "siift"})], "method", c.final),
    "unknown key": lambda c: (["train", c.recipe(), "train.lrr=1e-3"], "train.lrr", c.final),
    "wrong type": lambda c: (["train", c.recipe(), "train.lr=fast"], "train.lr", c.final),
    "negative batch": lambda c: (["train", c.recipe(), "train.batch_size=-4"], "train.batch_size", c.final),
    "zero steps": lambda c: (["train", c.recipe(), "train.max_steps=0"], "train.max_steps", c.final),
    "unknown task": lambda c: (["train", c.recipe(), "task.name=sst3"], "task.name", c.final),
    "override without =": lambda c: (["train", c.recipe(), "train.lr"], "train.lr", c.final),
    "override not YAML": lambda c: (["train", c.recipe(), "train.lr=[1"], "train.lr", c.final),
    "budget zero": lambda c: (["train", c.recipe(method={"name": "sift", "budget": 0})], "method.budget", c.final),
    "budget too big": lambda c: (["train", c.recipe(method={"name": "sift", "budget": 1e12})], "method.budget", c.final),
    "unknown dtype": lambda c: (["train", c.recipe(), "train.dtype=fp8"], "train.dtype", c.final),
    "unknown device": lambda c: (["train", c.recipe(), "train.device=tpu"], "train.device", c.final),
    "absent GPU": lambda c: (["train", c.recipe(), "train.device=cuda"], "train.device", c.final),
    "unknown model": lambda c: (["train", c.recipe(), f"model.name={c.tmp / 'no-model'}"], "model.name", c.final),
    "negative stop step": lambda c: (["train", c.recipe(), "--stop-at-step", "-1"], "--stop-at-step", c.final),
    "zero processes": lambda c: (["train", c.recipe(), "--nproc", "0"], "--nproc", c.final),
    "missing argument": lambda c: (["train"], "recipe_path", None),
    "unknown option": lambda c: (["train", c.recipe(), "--bogus"], "--bogus", c.final),
    # --- data ---
    "data folder missing": lambda c: (["train", c.recipe(), f"task.data_dir={c.tmp / 'nodata'}"], "task.data_dir", c.final),
    "data of another task": lambda c: (["train", c.recipe(), f"task.data_dir={c.glue / 'MRPC'}"], "train.tsv", c.final),
    "ragged dev row": lambda c: (["train", c.recipe(), c.override('SST-2', 'dev.tsv', 'a b c\t1\textra\n')], "dev.tsv", c.final),
    "data not text": lambda c: (["train", c.recipe(), c.override('SST-2', 'train.tsv', None, b'\xff\xfe')], "train.tsv", c.final),
    "unknown label": lambda c: (["train", c.recipe(), c.override('SST-2', 'train.tsv', 'odd film\t7\n')], "train.tsv", c.final),
    "score not a number": lambda c: (["train", c.recipe(task={"name": "stsb", "data_dir": str(c.glue_with('STS-B', 'dev.tsv', '\t'.join(['1', 'g', 'f', '2012', '0', 's', 's', 'a', 'b', 'high']) + '\n'))})], "dev.tsv", c.final),
    "instruct file missing": lambda c: (["train", c.recipe(task={"name": "instruct", "data_file": str(c.tmp / "no.json")})], "task.data_file", c.final),
    "instruct not JSON": lambda c: (["train", c.recipe(task={"name": "instruct", "data_file": str(c.write_bytes("a.json", b"{oops"))})], "task.data_file", c.final),
    "instruct lacks output": lambda c: (["train", c.recipe(task={"name": "instruct", "data_file": str(c.write_bytes("b.json", b'[{"instruction": "x"}]'))})], "task.data_file", c.final),
    # --- the run directory ---
    "output_dir is a file": lambda c: (["train", c.recipe(), f"output_dir={c.write_bytes('taken', b'x')}"], "output_dir", None),
    "output_dir under a file": lambda c: (["train", c.recipe(), f"output_dir={c.write_bytes('plain', b'x') / 'run'}"], "output_dir", None),
    "output_dir not a run": lambda c: (["train", c.recipe(), f"output_dir={c.folder_with_file()}"], "output_dir", None),
    "used run directory": lambda c: (["train", c.trained["recipe"]], "already holds a training run", None),
    "eval of a non-run": lambda c: (["eval", c.tmp], "recipe.yaml", None),
    "eval bad checkpoint name": lambda c: (["eval", c.trained["run"], "--checkpoint", "latest"], "--checkpoint", None),
    "eval absent checkpoint": lambda c: (["eval", c.trained["run"], "--checkpoint", "step-99"], "step-99", None),
    "eval damaged final": lambda c: (["eval", c.damaged_run("final")], "final", None),
    "resume with every checkpoint damaged": lambda c: (c.resume_all_damaged(), "no intact checkpoint", None),
    "export bad format": lambda c: (["export-delta", c.trained["run"], "-o", c.tmp / "out", "--format", "zip"], "--format", c.tmp / "out"),
    "report over no run": lambda c: (["report", c.tmp, "-o", c.tmp / "rep"], "RUN_DIR", c.tmp / "rep" / "report.md"),
    "report glob matching nothing": lambda c: (["report", str(c.tmp / "runs-*"), "-o", c.tmp / "rep"], "RUN_DIR", c.tmp / "rep" / "report.md"),
    # --- deltas ---
    "delta missing": lambda c: (["apply-delta", c.tmp / "no.safetensors", "-o", c.tmp / "m"], "no.safetensors", c.tmp / "m"),
    "delta not safetensors": lambda c: (["apply-delta", c.write_bytes("d.safetensors", b"not a delta"), "-o", c.tmp / "m"], "d.safetensors", c.tmp / "m"),
    "delta header without metadata": lambda c: (["apply-delta", c.headless_delta(), "-o", c.tmp / "m"], "meta", c.tmp / "m"),
    "delta index out of range": lambda c: (c.apply(lambda t: t[first(t, "idx")].__setitem__(0, 10**8)), "[0,", c.tmp / "m"),
    "delta negative index": lambda c: (c.apply(lambda t: t[first(t, "idx")].__setitem__(0, -1)), "[0,", c.tmp / "m"),
    "delta repeated index": lambda c: (c.apply(lambda t: t[first(t, "idx")].__setitem__(1, int(t[first(t, "idx")][0]))), "repeated", c.tmp / "m"),
    "delta float indices": lambda c: (c.apply(lambda t: _set(t, first(t, "idx"), t[first(t, "idx")].float())), "int32/int64", c.tmp / "m"),
    "delta 2-D indices": lambda c: (c.apply(lambda t: _set(t, first(t, "idx"), t[first(t, "idx")][:2].reshape(1, 2))), "1-D", c.tmp / "m"),
    "delta values of another length": lambda c: (c.apply(lambda t: _set(t, first(t, "val"), t[first(t, "val")][:-1])), "one per index", c.tmp / "m"),
    "delta integer values": lambda c: (c.apply(lambda t: _set(t, first(t, "val"), t[first(t, "val")].long())), "floating-point", c.tmp / "m"),
    "delta dense of another shape": lambda c: (c.apply(lambda t: _set(t, first(t, "dense"), t[first(t, "dense")].reshape(1, -1).clone())), "shape", c.tmp / "m"),
    "delta index without values": lambda c: (c.apply(lambda t: t.pop(first(t, "val"))), ".val", c.tmp / "m"),
}


class Context:
    def __init__(self, tmp: Path, bert_recipe, glue_root: Path, trained: dict):
        self.tmp, self.glue, self.trained, self._recipe = tmp, glue_root, trained, bert_recipe
        self.final = tmp / "run" / "final"

    def recipe(self, method: dict | None = None, task: dict | None = None) -> Path:
        path = self._recipe(method or {"name": "sift", "budget": 0.05, "warmup_batches": 1})
        if task:
            raw = yaml.safe_load(path.read_text())
            raw["task"] = task
            path.write_text(yaml.safe_dump(raw))
        return path

    def write_bytes(self, name: str, data: bytes) -> Path:
        (self.tmp / name).write_bytes(data)
        return self.tmp / name

    def glue_with(self, folder: str, file: str, extra_line: str | None, raw: bytes | None = None) -> Path:
        """A copy of the GLUE root whose `folder/file` gets `extra_line` appended (or `raw` bytes)."""
        root = self.tmp / "glue-copy"
        shutil.copytree(self.glue / folder, root / folder)
        with (root / folder / file).open("ab") as handle:
            handle.write(raw if raw is not None else extra_line.encode())
        return root

    def override(self, folder: str, file: str, extra_line: str | None, raw: bytes | None = None) -> str:
        return f"task.data_dir={self.glue_with(folder, file, extra_line, raw)}"

    def folder_with_file(self) -> Path:
        (self.tmp / "notes").mkdir()
        (self.tmp / "notes" / "todo.txt").write_text("x")
        return self.tmp / "notes"

    def copy_run(self) -> Path:
        run = self.tmp / "copied-run"
        shutil.copytree(self.trained["run"], run)
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        recipe["output_dir"] = str(run)
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        return run

    def damaged_run(self, folder: str) -> Path:
        run = self.copy_run()
        target = run / folder / "trainable.safetensors"
        target.write_bytes(target.read_bytes()[:-100])
        return run

    def resume_all_damaged(self) -> list:
        run = self.copy_run()
        shutil.rmtree(run / "final")
        for checkpoint in (run / "checkpoints").iterdir():
            (checkpoint / "state.pt").write_bytes(b"truncated")
        return ["train", run / "recipe.yaml", "--resume"]

    def headless_delta(self) -> Path:
        path = self.tmp / "headless.safetensors"
        save_file({"x.dense": torch.zeros(2)}, str(path), metadata={"format": "sparsetune-delta", "version": "1"})
        return path

    def apply(self, change) -> list:
        return ["apply-delta", tampered_delta(self.trained, self.tmp, change), "-o", self.tmp / "m"]


def test_there_are_forty_cases_or_more():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line(case, tmp_path, bert_recipe, glue_root, trained, capsys):
    args, named, absent = CASES[case](Context(tmp_path, bert_recipe, glue_root, trained))
    capsys.readouterr()
    assert run_cli(*args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]  # progress messages may come first
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err
    assert named in errors[0]
    assert not any("entries in" in line for line in lines)  # nothing is computed before the input is checked
    assert "Traceback" not in captured.err + captured.out
    if absent is not None:  # nothing at the target, not even under its temporary name
        assert not absent.exists() and not list(absent.parent.glob(f".{absent.name}.tmp*"))


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, trained, capsys):
    """A truncated newest checkpoint: resume warns, names it, continues from the one before, and ends where an
    uninterrupted run ends."""
    run = Context(tmp_path, None, tmp_path, trained).copy_run()
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "eval")
    newest = max((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    (newest / "trainable.safetensors").write_bytes((newest / "trainable.safetensors").read_bytes()[:50])
    capsys.readouterr()
    assert run_cli("train", run / "recipe.yaml", "--resume") == 0
    err = capsys.readouterr().err
    assert f"warning: {newest} is damaged (trainable.safetensors does not match its checksum)" in err
    from safetensors.torch import load_file

    a, b = load_file(run / "final/trainable.safetensors"), load_file(trained["run"] / "final/trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and losses(run) == losses(trained["run"])
    assert json.loads((run / "checkpoints" / newest.name / "checksums.json").read_text())  # rewritten, sealed


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func)


@pytest.fixture(scope="module")
def project_sources() -> dict[Path, ast.AST]:
    files = [*(SOURCES / "sparsetune").rglob("*.py"), *(SOURCES / "scripts").glob("*.py")]
    return {path: ast.parse(path.read_text()) for path in files}


def test_no_pickle_but_weights_only_torch_load(project_sources):
    for path, tree in project_sources.items():
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"pickle", "dill", "cloudpickle", "marshal", "shelve"}, path
        for call in _calls(tree):
            if _name(call) == "torch.load":
                assert any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in call.keywords), path


def test_yaml_is_only_safe_loaded(project_sources):
    for path, tree in project_sources.items():
        for call in _calls(tree):
            name = _name(call)
            assert not (name.startswith("yaml.") and name.split(".")[-1] in {"load", "load_all", "unsafe_load",
                                                                              "full_load"}), (path, name)


def test_remote_code_only_from_the_recipe_key(project_sources, bert_recipe, tmp_path):
    """Every from_pretrained of a model or tokenizer states trust_remote_code, and only the recipe key sets it."""
    for path, tree in project_sources.items():
        for call in _calls(tree):
            if _name(call).endswith("from_pretrained") and "gguf_file" not in ast.unparse(call) \
                    and "Peft" not in _name(call):
                assert any(k.arg is None or k.arg == "trust_remote_code" for k in call.keywords), (path, ast.unparse(call))
            for keyword in call.keywords:
                if keyword.arg == "trust_remote_code":
                    assert ast.unparse(keyword.value) != "True", path
    recipe = bert_recipe({"name": "full"}, max_steps=1)
    assert run_cli("train", recipe) == 0
    assert json.loads((tmp_path / "run/manifest.json").read_text())["trust_remote_code"] is False
