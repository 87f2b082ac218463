"""Config: YAML + dotted overrides, typo suggestions, types and ranges, saved-config round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from reasonrl.config import Config, all_keys, config_diff, describe, load_config
from reasonrl.errors import UserError


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert cfg.model.name == "tiny" and cfg.data.source == "arithmetic" and cfg.algorithm.advantage == "grpo"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  advantage: rloo\n  eps_high: 0.28\nrollout:\n  group_size: 4\n")
    cfg = load_config(path, ["rollout.group_size=8", "train.lr=1e-4", "data.columns={prompt: question}"])
    assert cfg.algorithm.advantage == "rloo" and cfg.algorithm.eps_high == 0.28
    assert cfg.rollout.group_size == 8 and cfg.train.lr == 1e-4
    assert cfg.data.columns == {"prompt": "question"}


@pytest.mark.parametrize(
    "override,message",
    [
        ("algorithm.advantag=rloo", "unknown config key 'algorithm.advantag' (did you mean 'algorithm.advantage'?)"),
        ("rollout.groupsize=4", "did you mean 'rollout.group_size'"),
        ("rollout.group_size=abc", "config 'rollout.group_size' must be int, got 'abc'"),
        ("rollout.group_size=0", "config 'rollout.group_size' must be >= 1, got 0"),
        ("rollout.top_p=1.5", "must be <= 1"),
        ("algorithm.loss_agg=token_mean", "must be one of seq-mean-token-mean, token-mean, seq-mean-token-sum-norm"),
        ("train.mask=1", "unknown config key"),
        ("algorithm=3", "must be a section"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_bad_overrides_are_one_line_user_errors(override, message):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)


def test_saved_config_round_trips_and_diff(tmp_path):
    cfg = load_config(None, ["algorithm.advantage=rloo", "algorithm.max_len_norm=100", "data.columns={id: uid}"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and config_diff(cfg, again) == []
    assert config_diff(cfg, Config()) == ["data.columns", "algorithm.advantage", "algorithm.max_len_norm"]


def test_every_key_is_overridable():
    for key in all_keys():
        value, _ = describe(key)
        if value is None or isinstance(value, (dict, list)):
            continue
        cfg = load_config(None, [f"{key}={value}"]).to_dict()
        for part in key.split("."):
            cfg = cfg[part]
        assert cfg == value


def test_configuration_doc_lists_every_option():
    from pathlib import Path

    from reasonrl.config import reference_markdown

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert reference_markdown() in doc, "regenerate the table in docs/configuration.md from reference_markdown()"


def test_the_same_key_in_two_sections_is_no_duplicate(tmp_path):
    """(A key given twice in one section: tests/test_bad_input_config.py.)"""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-5\nrollout:\n  lr: 1\n")  # the same name in two sections is no duplicate
    with pytest.raises(UserError, match="unknown config key 'rollout.lr'"):
        load_config(path)


def test_configuration_doc_has_the_trl_table():
    from pathlib import Path

    from reasonrl.config import trl_markdown

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert trl_markdown() in doc, "regenerate the 'Coming from TRL' table in docs/configuration.md"


def test_scale_rewards_takes_trls_boolean_spelling():
    """TRL's `scale_rewards: true/false` means group / none; only booleans alias (1 is not true here)."""
    assert load_config(None, ["algorithm.scale_rewards=true"]).algorithm.scale_rewards == "group"
    assert load_config(None, ["algorithm.scale_rewards=false"]).algorithm.scale_rewards == "none"
    assert load_config(None, ["algorithm.scale_rewards=batch"]).algorithm.scale_rewards == "batch"
    with pytest.raises(UserError, match="must be one of group, batch, none"):
        load_config(None, ["algorithm.scale_rewards=1"])


def test_reward_functions_without_weights_weigh_one_each(tmp_path):
    """The default weights [1.0, 0.1] belong to the default functions; functions set without weights (override or
    file) get 1.0 each, as in TRL, and weights given with them are kept."""
    assert load_config().rewards.weights == [1.0, 0.1]
    assert load_config(None, ["rewards.functions=[format]"]).rewards.weights is None
    cfg = load_config(None, ["rewards.functions=[format, math_answer]", "rewards.weights=[0.5, 2]"])
    assert cfg.rewards.weights == [0.5, 2.0]
    path = tmp_path / "c.yaml"
    path.write_text("rewards:\n  functions: [math_answer]\n")
    assert load_config(path).rewards.weights is None
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").rewards.weights == [0.5, 2.0]


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_its_header_says_how_to_launch_it(recipe):
    """Each recipe is a valid config whose opening comment gives the command that runs it; a sharded recipe's command
    starts several processes (on one process `train.sharding=fsdp` trains unsharded, which would not fit)."""
    cfg = load_config(recipe)
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"--config recipes/{recipe.name}" in header
    if cfg.train.sharding == "fsdp":
        assert "--num_processes" in header and "Hardware:" in header
