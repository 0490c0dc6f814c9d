"""Validation of params.yaml sections: defaults, ranges, types, typos and the iters chain."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from minichatgpt.params import (
    SECTIONS,
    Iteration,
    ParamsError,
    PPOParams,
    iterations,
    load_yaml,
    section,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def raises(raw: dict, name: str, *fragments: str) -> str:
    with pytest.raises(ParamsError) as err:
        section(raw, name)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_defaults_are_valid(name):
    cls = SECTIONS[name]
    assert section({}, name) == cls()
    assert section({name: None}, name) == cls()
    assert section({name: {}}, name) == cls()


def test_values_are_read():
    ppo = section({"ppo": {"lam": 0.9, "batch_size": 32, "mini_batch_size": 8, "kl_penalty": "k3"}}, "ppo")
    assert (ppo.lam, ppo.batch_size, ppo.mini_batch_size, ppo.kl_penalty) == (0.9, 32, 8, "k3")
    assert ppo.gamma == PPOParams().gamma


def test_int_accepted_for_float():
    ppo = section({"ppo": {"learning_rate": 1, "gamma": 0}}, "ppo")
    assert isinstance(ppo.learning_rate, float) and ppo.learning_rate == 1.0
    assert isinstance(ppo.gamma, float) and ppo.gamma == 0.0


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_gamma_lam_bounds_inclusive(value):
    ppo = section({"ppo": {"gamma": value, "lam": value}}, "ppo")
    assert ppo.gamma == value and ppo.lam == value


@pytest.mark.parametrize(
    "overrides,field,bad",
    [
        ({"lam": 1.5}, "ppo.lam", "1.5"),
        ({"lam": -0.01}, "ppo.lam", "-0.01"),
        ({"gamma": -0.1}, "ppo.gamma", "-0.1"),
        ({"gamma": 1.01}, "ppo.gamma", "1.01"),
        ({"cliprange": 0}, "ppo.cliprange", "0"),
        ({"cliprange_value": -0.2}, "ppo.cliprange_value", "-0.2"),
        ({"ppo_epochs": 0}, "ppo.ppo_epochs", "0"),
        ({"batch_size": 10, "mini_batch_size": 4}, "ppo.batch_size", "10"),
        ({"kl_penalty": "k2"}, "ppo.kl_penalty", "'k2'"),
        ({"learning_rate": 0}, "ppo.learning_rate", "0"),
        ({"ratio_threshold": 1.0}, "ppo.ratio_threshold", "1.0"),
        ({"max_grad_norm": -1.0}, "ppo.max_grad_norm", "-1.0"),
    ],
)
def test_ppo_out_of_range(overrides, field, bad):
    raises({"ppo": overrides}, "ppo", f"{field}={bad}")


@pytest.mark.parametrize("name", ["data", "pretrain", "reward", "ppo", "evaluate"])
def test_a_negative_seed_is_refused(name):
    raises({name: {"seed": -1}}, name, f"{name}.seed=-1")  # numpy's generators refuse it only mid-stage


def test_batch_size_message_names_mini_batch_size():
    raises({"ppo": {"batch_size": 10, "mini_batch_size": 4}}, "ppo", "ppo.batch_size=10", "mini_batch_size", "4")


def test_kl_penalty_message_lists_estimators():
    raises({"ppo": {"kl_penalty": "k2"}}, "ppo", "'k2'", "kl", "k3", "full")


@pytest.mark.parametrize(
    "name,overrides,field,bad",
    [
        ("data", {"input_min_text_length": 5, "input_max_text_length": 4}, "data.input_max_text_length", "4"),
        ("data", {"eval_prompts": 1}, "data.eval_prompts", "1"),
        ("pretrain", {"n_embd": 130, "n_head": 4}, "pretrain.n_embd", "130"),
        ("pretrain", {"block_size": 128, "n_positions": 64}, "pretrain.block_size", "128"),
        ("pretrain", {"vocab_size": 299}, "pretrain.vocab_size", "299"),
        ("reward", {"max_length": 7}, "reward.max_length", "7"),
        ("generation", {"top_p": 0.0}, "generation.top_p", "0.0"),
        ("generation", {"output_min_length": 8, "output_max_length": 4}, "generation.output_max_length", "4"),
        ("evaluate", {"samples": -1}, "evaluate.samples", "-1"),
    ],
)
def test_other_sections_out_of_range(name, overrides, field, bad):
    raises({name: overrides}, name, f"{field}={bad}")


@pytest.mark.parametrize(
    "name,overrides,field,bad",
    [
        ("ppo", {"lam": "0.95"}, "ppo.lam", "'0.95'"),
        ("ppo", {"learning_rate": True}, "ppo.learning_rate", "True"),
        ("ppo", {"batch_size": True}, "ppo.batch_size", "True"),
        ("ppo", {"batch_size": 256.0}, "ppo.batch_size", "256.0"),
        ("ppo", {"ppo_epochs": "4"}, "ppo.ppo_epochs", "'4'"),
        ("ppo", {"adap_kl_ctrl": 1}, "ppo.adap_kl_ctrl", "1"),
        ("ppo", {"kl_penalty": 3}, "ppo.kl_penalty", "3"),
        ("runtime", {"threads": False}, "runtime.threads", "False"),
        ("pretrain", {"model": None}, "pretrain.model", "None"),
    ],
)
def test_mistyped_values(name, overrides, field, bad):
    raises({name: overrides}, name, f"{field}={bad}", "expected")


@pytest.mark.parametrize(
    "name,key,suggestion",
    [
        ("ppo", "lamb", "ppo.lam"),
        ("ppo", "clip_range", "ppo.cliprange"),
        ("ppo", "mini_batchsize", "ppo.mini_batch_size"),
        ("generation", "top_kk", "generation.top_k"),
        ("data", "sed", "data.seed"),
    ],
)
def test_unknown_key_suggests_close_name(name, key, suggestion):
    msg = raises({name: {key: 1}}, name, f"{name}.{key}", f"did you mean {suggestion}?")
    assert "unknown key" in msg


def test_unknown_key_always_names_the_closest_valid_one():
    raises({"evaluate": {"zzzzzz": 1}}, "evaluate", "evaluate.zzzzzz", "did you mean evaluate.")
    raises({"ppo": {"lr": 1e-4}}, "ppo", "unknown key ppo.lr; did you mean ppo.learning_rate?")
    raises({"ppo": {"epochs": 2}}, "ppo", "unknown key ppo.epochs; did you mean ppo.ppo_epochs?")


def test_section_not_a_mapping():
    raises({"ppo": [1, 2]}, "ppo", "ppo", "mapping", "list")


def test_load_yaml_valid(tmp_path):
    raw = load_yaml(write(tmp_path, "ppo:\n  lam: 0.9\n  iterations: 3\n"))
    assert section(raw, "ppo").lam == 0.9
    assert section(raw, "data") == SECTIONS["data"]()


def test_load_yaml_unknown_section(tmp_path):
    path = write(tmp_path, "ppoo:\n  lam: 0.9\n")
    with pytest.raises(ParamsError) as err:
        load_yaml(path)
    msg = str(err.value)
    assert str(path) in msg and "unknown section ppoo" in msg and "did you mean ppo?" in msg


@pytest.mark.parametrize("text,fragment", [
    ("- 1\n- 2\n", "mapping"),
    ("ppo: [\n", "not valid YAML"),
    ("", "mapping"),
])
def test_load_yaml_bad_files(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ParamsError, match=fragment):
        load_yaml(path)


def test_load_yaml_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_iterations_chain():
    its = iterations({"ppo": {"iterations": 3}})
    assert list(its) == ["1", "2", "3"]
    assert its["1"] == Iteration(prev="0") and its["3"] == Iteration(prev="2")
    assert list(iterations({})) == [str(i) for i in range(1, 11)]  # the default


@pytest.mark.parametrize("value,fragment", [(0, ">= 1"), (-2, ">= 1"), ("5", "an integer"), (2.5, "an integer")])
def test_iterations_refused(value, fragment):
    with pytest.raises(ParamsError) as err:
        iterations({"ppo": {"iterations": value}})
    assert f"ppo.iterations={value!r}" in str(err.value) and fragment in str(err.value)


def test_the_old_iters_section_says_what_replaced_it(tmp_path):
    path = write(tmp_path, "ppo:\n  lam: 0.9\niters:\n  '1':\n    prev: '0'\n")
    with pytest.raises(ParamsError) as err:
        load_yaml(path)
    assert str(path) in str(err.value) and "ppo.iterations" in str(err.value)


def test_repo_params_yaml_validates():
    raw = load_yaml(ROOT / "params.yaml")
    on_disk = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, cls in SECTIONS.items():
        obj = section(raw, name)
        assert isinstance(obj, cls)
        for key, value in (on_disk.get(name) or {}).items():
            assert getattr(obj, key) == value
        assert set(on_disk.get(name) or {}) <= {f.name for f in dataclasses.fields(cls)}
    its = iterations(raw)
    assert list(its) == [str(n) for n in range(1, len(its) + 1)]
    assert all(it.prev == str(int(key) - 1) for key, it in its.items())

