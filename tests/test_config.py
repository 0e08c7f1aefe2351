"""The real config: composition, params.yaml drift, every preset parses."""

import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose

from ptqflow.config import (
    AutoRecipeConfig,
    CalibConfig,
    EvalConfig,
    ModelConfig,
    PathsConfig,
    SensitivityConfig,
    TrackingConfig,
    parse,
    parse_act,
    parse_quant,
    parse_recipe,
    quant_label,
)


def test_params_yaml_equals_composition_of_conf(tmp_path):
    """params.yaml must be exactly what DVC's Hydra mode composes from conf/ (`make params`)."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(ROOT), [])
    committed = (ROOT / "params.yaml").read_text()
    assert committed == out.read_text(), "params.yaml is stale: run `make params` and commit it"


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def test_default_config_parses():
    cfg = compose([])
    assert parse(ModelConfig, "model", cfg["model"]).name == "smollm2_135m"
    assert parse(CalibConfig, "calib", cfg["calib"]) == CalibConfig()
    assert parse(EvalConfig, "eval", cfg["eval"]) == EvalConfig()
    assert parse(TrackingConfig, "tracking", cfg["tracking"]).uri == "sqlite:///mlflow.db"
    assert parse(PathsConfig, "paths", cfg["paths"]) == PathsConfig()
    quant = parse_quant(cfg["quant"])
    assert quant.tag == "w4g64"
    assert parse_recipe(cfg["recipe"], quant).name == "default"


# presets whose name is not their tag: name -> the whole section's tag
LABELS = {
    "w8a8": "w8pc-sym-a8",
    "w4a8": "w4pc-a8",
    "fp8_dynamic": "fp8pc-afp8",
    "fp8_static": "fp8t-afp8t",
    "fp8_block": "fp8b128x128-afp8",
    "fp8_weight": "fp8pc",
    "nvfp4a16": "nvfp4",
    "mxfp4a16": "mxfp4",
}


@pytest.mark.parametrize("name", presets("quant"))
def test_quant_presets(name):
    values = compose([f"quant={name}"])["quant"]
    if name in LABELS:
        assert quant_label(values) == LABELS[name]
    else:
        assert parse_quant(values).tag.replace("-", "_").startswith(name.split("_")[0])
        assert parse_act(values) is None and quant_label(values) == parse_quant(values).tag


@pytest.mark.parametrize(
    "override, message",
    [
        ({"a_bit": 3}, "a_bit=3 is out of range"),
        ({"a_bit": 8, "a_granularity": "channel"}, "a_granularity='channel'"),
        ({"a_granularity": "tensor"}, "a_bit is null"),
        ({"a_type": "fp8"}, "a_type='fp8' is set but a_bit is null"),
        ({"a_bit": 8, "a_type": "fp4"}, "a_type=fp4 (FP4 E2M1) is not an activation type yet"),
        ({"a_bit": "8"}, "a_bit='8' is a str"),
    ],
)
def test_bad_activation_keys(override, message):
    values = compose([])["quant"] | override
    for fn in (parse_act, parse_quant):  # either half of the section refuses them
        with pytest.raises(ValueError, match=re.escape(message)):
            fn(values)


def test_static_activation_tag():
    values = compose(["quant=w8a8", "quant.a_granularity=tensor"])["quant"]
    assert quant_label(values) == "w8pc-sym-a8t"


@pytest.mark.parametrize("name", presets("recipe"))
def test_recipe_presets(name):
    cfg = compose([f"recipe={name}"])
    if name == "auto":
        assert parse(AutoRecipeConfig, "recipe", cfg["recipe"]).budget > 0
        with pytest.raises(ValueError, match="recipe stage"):
            parse_recipe(cfg["recipe"], parse_quant(cfg["quant"]))
    else:
        assert parse_recipe(cfg["recipe"], parse_quant(cfg["quant"])).name == name


@pytest.mark.parametrize("group", ["calib", "eval", "tracking", "sensitivity"])
def test_other_presets_parse(group):
    cls = {
        "calib": CalibConfig,
        "eval": EvalConfig,
        "tracking": TrackingConfig,
        "sensitivity": SensitivityConfig,
    }[group]
    for name in presets(group):
        parse(cls, group, compose([f"{group}={name}"])[group])


def test_experiment_presets_compose():
    w3 = compose(["experiment=rtn_w3g64"])
    assert (w3["quant"]["w_bit"], w3["pack"]["format"]) == (3, "ptqflow")
    assert compose(["experiment=smoke"])["eval"]["n_windows"] == 4


def test_unknown_and_invalid_keys_name_the_section():
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['n_sample'\] in config section 'calib'"
    ):
        parse(CalibConfig, "calib", {"n_sample": 3})
    with pytest.raises(ValueError, match="section 'eval'.*method='awq2'"):
        parse(EvalConfig, "eval", {"method": "awq2"})
    with pytest.raises(ValueError, match="section 'calib'.*seqlen=0"):
        parse(CalibConfig, "calib", {"seqlen": 0})
    with pytest.raises(ValueError, match="section 'quant'.*w_bit=12"):
        parse_quant({"w_bit": 12, "group_size": 64, "zero_point": True})


def test_dvc_yaml_params_exist_in_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in stage.get("params", []):
            if isinstance(key, dict):  # a whole file: the check stage
                assert key == {"params.yaml": None}, key
                continue
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name}: param '{key}' not in params.yaml"
                node = node[part]
        outs = {
            o if isinstance(o, str) else next(iter(o))
            for st in stages.values()
            for kind in ("outs", "metrics", "plots")
            for o in st.get(kind, [])
        }
        for dep in stage["deps"]:
            assert dep in outs or Path(ROOT / dep).exists(), f"stage {name}: dep {dep} missing"


def test_model_device_is_validated():
    with pytest.raises(ValueError, match="device='tpu'"):
        parse(ModelConfig, "model", {"name": "m", "source": "s", "device": "tpu"})
    assert (
        parse(ModelConfig, "model", {"name": "m", "source": "s", "device": "cpu"})
        .torch_device()
        .type
        == "cpu"
    )


def test_an_unknown_quant_key_lists_the_activation_keys_too():
    from ptqflow.config import parse_quant

    expected = (
        "known: ['a_bit', 'a_granularity', 'a_type', 'group_rows', 'group_size', 'scale_type', "
        "'type', 'w_bit', 'zero_point']"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_quant({"w_bit": 4, "group_size": 64, "zero_point": True, "a_bits": 8})
