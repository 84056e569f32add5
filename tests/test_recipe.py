"""Recipe schema: unknown keys, wrong types and unknown names fail with one line naming the key."""

from __future__ import annotations

import pytest

from sparsetune.errors import UserError
from sparsetune.recipe import build_recipe, load_recipe, parse_override

from conftest import run_cli


def base(**changes) -> dict:
    raw = {"output_dir": "runs/x", "task": {"name": "sst2"}, "method": {"name": "full"}}
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (base(trian={}), "unknown key 'trian' (did you mean 'train'?)"),
        (base(train={"lrr": 1e-4}), "unknown key 'train.lrr' (did you mean 'lr'?)"),
        (base(method={"name": "lora", "rr": 4}), "unknown key 'method.rr' (did you mean 'r'?)"),
        (base(train={"lr": "fast"}), "train.lr: Input should be a valid number"),
        (base(train={"batch_size": 0}), "train.batch_size: Input should be greater than 0"),
        (base(method={"name": "siftt"}), "unknown method.name 'siftt'"),
        (base(task={"name": "sst-2"}), "unknown task.name 'sst-2'; expected one of"),
        ({"output_dir": "x", "method": {"name": "full"}}, "missing required key 'task'"),
        (base(method={}), "missing required key 'method.name'"),
    ],
)
def test_bad_recipes_name_the_key(raw, message):
    with pytest.raises(UserError, match=None) as info:
        build_recipe(raw, "r.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_parse_yaml_scalars(tmp_path):
    assert parse_override("train.lr=2e-4") == (["train", "lr"], 2e-4)
    assert parse_override("task.train_limit=64") == (["task", "train_limit"], 64)
    assert parse_override("train.max_grad_norm=null") == (["train", "max_grad_norm"], None)
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: a\ntask: {name: sst2}\nmethod: {name: full}\n")
    recipe = load_recipe(path, ["train.lr=2e-4", "output_dir=runs/b", "method.name=lora", "method.r=4"])
    assert recipe.train.lr == 2e-4 and str(recipe.output_dir) == "runs/b"
    assert recipe.method.name == "lora" and recipe.method.r == 4
    with pytest.raises(UserError, match="expected key=value"):
        parse_override("train.lr")


def test_fingerprint_ignores_output_dir():
    a = build_recipe(base())
    b = build_recipe(base(output_dir="elsewhere"))
    c = build_recipe(base(seed=1))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.lrr=1"], "unknown key 'train.lrr'"),
        (["model.name=no-such-model"], "model.name: 'no-such-model' is not a packaged alias"),
        (["task.data_dir=/nonexistent/SST-2"], "task.data_dir: folder '/nonexistent/SST-2' not found"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\ntask: {{name: sst2, data_dir: /tmp}}\nmethod: {{name: full}}\n")
    assert run_cli("train", recipe, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error:") and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_cli_missing_recipe_file(capsys):
    assert run_cli("validate", "no/such/recipe.yaml") == 2
    assert "recipe file 'no/such/recipe.yaml' not found" in capsys.readouterr().err


def test_a_section_named_on_the_command_line_takes_dotted_keys_and_keeps_its_settings(tmp_path):
    """`method.base=sift method.base.budget=0.03` on an IST recipe: the second key sets the new base's field;
    naming the recipe's own base again keeps the recipe's settings for it."""
    import yaml

    recipe = tmp_path / "ist.yaml"
    recipe.write_text(yaml.safe_dump(base(method={"name": "ist", "base": {"name": "lora", "r": 4, "alpha": 32}})))
    sift = load_recipe(recipe, ["method.base=sift", "method.base.budget=0.03"]).method.base
    assert (sift.name, sift.budget) == ("sift", 0.03)
    assert load_recipe(recipe, ["method.base=sift"]).method.base.budget == type(sift)().budget  # SIFT's defaults
    lora = load_recipe(recipe, ["method.base=lora"]).method.base
    assert (lora.name, lora.r, lora.alpha) == ("lora", 4, 32)  # the recipe's settings, not LoRA's defaults
    assert load_recipe(recipe, ["method.base=lora", "method.base.r=2"]).method.base.r == 2
