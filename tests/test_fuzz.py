"""The shipped recipes mutated at random (seeded): wrong types, missing and extra keys, odd values. Each goes
through the real CLI (`sparsetune validate`) and must end as a recipe that validates or as one `error:` line,
never a traceback."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml")
                 if p.parent.name != "sweeps")  # sweep files are tested in test_sweep.py
CASES = 400
ODD_VALUES = [None, -1, 0, 1, -0.5, 1e30, 10**20, "", "x", "1e-3", "../..", True, [], [1, "a"], {}, {"name": "x"},
              float("nan"), float("inf"), "auto", "sift", "  ", "é", 2**31]


def mutate(recipe: dict, rng: random.Random) -> object:
    """One to three random edits of a recipe mapping (or, now and then, the whole recipe replaced)."""
    if rng.random() < 0.03:
        return rng.choice(ODD_VALUES)
    recipe = copy.deepcopy(recipe)
    for _ in range(rng.randint(1, 3)):
        path = _random_path(recipe, rng)
        parent = recipe
        for key in path[:-1]:
            parent = parent[key]
        key, edit = path[-1], rng.random()
        value = parent[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and rng.random() < 0.5:
            parent[key] = type(value)(value * rng.choice([0, -1, 3, 1000, 10**6, 0.001]))  # in type, odd in size
        elif edit < 0.45:
            parent[key] = rng.choice(ODD_VALUES)  # a wrong type or an odd value
        elif edit < 0.65:
            del parent[key]  # a missing key
        elif edit < 0.85:
            parent[rng.choice(["extra", "lrr", "nme", key + "_"])] = rng.choice(ODD_VALUES)  # an extra key
        else:
            other = rng.choice(["full", "lora", "sift", "ist", "zeroing", "sift2"])
            recipe.setdefault("method", {})
            if isinstance(recipe["method"], dict):
                recipe["method"]["name"] = other  # another method with this one's keys
    return recipe


def _random_path(tree: dict, rng: random.Random) -> list:
    path, node = [], tree
    while True:
        key = rng.choice(list(node))
        path.append(key)
        if not isinstance(node[key], dict) or not node[key] or rng.random() < 0.3:
            return path
        node = node[key]


def _random_override(recipe: dict, rng: random.Random) -> str:
    """A command-line override of a random (possibly absent) dotted key with an odd YAML scalar."""
    keys = [f"{section}.{key}" for section, body in recipe.items() if isinstance(body, dict) for key in body]
    key = rng.choice(keys + ["train.nope", "method", "seed", "a.b.c", ""]) if keys else "seed"
    value = rng.choice(["-1", "0", "1e-3", "abc", "[1", "{a: 1}", "null", "", "true", "1e400", "'x'"])
    return f"{key}={value}" if rng.random() < 0.9 else key


@pytest.fixture(scope="module")
def sources(tiny_bert, tiny_llama) -> list[dict]:
    """The shipped recipes on the tiny models (validation loads the model), instruction recipes on the Llama."""
    loaded = []
    for path in RECIPES:
        raw = yaml.safe_load(path.read_text())
        instruct = raw.get("task", {}).get("name") == "instruct"
        raw.setdefault("model", {})["name"] = str(tiny_llama if instruct else tiny_bert)
        loaded.append(raw)
    return loaded


def test_mutated_recipes_never_end_in_a_traceback(tmp_path, sources, capsys):
    rng = random.Random(0)
    outcomes = {0: 0, 2: 0}
    for case in range(CASES):
        mutated = mutate(rng.choice(sources), rng)
        path = tmp_path / f"case-{case}.yaml"
        path.write_text(yaml.safe_dump(mutated, allow_unicode=True))
        overrides = [_random_override(mutated, rng) for _ in range(rng.randint(0, 2))] if isinstance(mutated, dict) else []
        code = run_cli("validate", path, *overrides)  # an exception other than a user error fails the test
        err = capsys.readouterr().err
        assert code in outcomes, (case, mutated, err)
        assert "Traceback" not in err, (case, mutated)
        if code == 2:
            assert err.strip().splitlines()[-1].startswith("error: "), (case, mutated, err)
        outcomes[code] += 1
    assert outcomes[2] > CASES / 2 and outcomes[0] > 10  # mostly refused, some still valid
    print(outcomes)
