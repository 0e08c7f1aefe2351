import pytest

from ptqflow.quant import QuantSpec
from ptqflow.recipe import Recipe, Rule, parse_layers

LINEARS = [
    ("model.layers.0.self_attn.q_proj", 0, 64),
    ("model.layers.0.mlp.down_proj", 0, 128),
    ("model.layers.1.self_attn.q_proj", 1, 64),
    ("model.layers.1.mlp.down_proj", 1, 128),
    ("lm_head", None, 64),
]
Q4 = QuantSpec(4, 32)
W8 = QuantSpec(8, -1)


def recipe(rules, default="skip", configs=None):
    return Recipe.from_dict(
        {"rules": rules, "default": default, "configs": configs or {}}, {"quant": Q4}
    )


def test_default_recipe_quantizes_decoder_linears_only():
    plan = recipe([{"modules": "*", "layers": "0:", "config": "quant"}]).resolve(LINEARS)
    assert plan["lm_head"] is None
    assert all(plan[n] == Q4 for n, layer, _ in LINEARS if layer is not None)
    assert list(plan) == [n for n, _, _ in LINEARS]


def test_first_match_wins_and_layer_ranges():
    r = recipe(
        [
            {"modules": "*.down_proj", "layers": "1:", "config": "w8", "name": "late-down"},
            {"modules": "*", "layers": "0:", "config": "quant"},
        ],
        configs={"w8": {"w_bit": 8, "group_size": -1}},
    )
    plan = r.resolve(LINEARS)
    assert plan["model.layers.1.mlp.down_proj"] == W8
    assert plan["model.layers.0.mlp.down_proj"] == Q4
    assert r.spec_for("model.layers.1.mlp.down_proj", 1) == (W8, "late-down")
    assert r.spec_for("lm_head", None) == (None, "default")


def test_regex_rules_and_skip():
    r = recipe(
        [
            {"modules": r"re:.*layers\.0\..*", "config": "skip"},
            {"modules": "model.layers.*", "config": "quant"},
        ]
    )
    plan = r.resolve(LINEARS)
    assert plan["model.layers.0.self_attn.q_proj"] is None
    assert plan["model.layers.1.self_attn.q_proj"] == Q4


def test_glob_is_case_sensitive_full_match():
    assert not Rule("layers.*", "quant").matches("model.layers.0.q", 0)
    assert Rule("*layers.*", "quant").matches("model.layers.0.q", 0)


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, None),
        (3, [range(3, 4)]),
        ("2:5", [range(2, 5)]),
        (":2", [range(0, 2)]),
        ("7", [range(7, 8)]),
        ("0:3, 5,8", [range(0, 3), range(5, 6), range(8, 9)]),
    ],
    ids=["none", "int", "slice", "open-start", "digit-string", "list"],
)
def test_parse_layers(spec, expected):
    got = parse_layers(spec)
    assert got == (expected if expected is None else tuple(expected))


def test_open_range_has_no_end():
    (r,) = parse_layers("4:")
    assert 10_000 in r


def test_a_layer_list_matches_each_of_its_layers():
    rule = Rule("*.down_proj", "quant", layers="0:2,5,28:")
    hits = [i for i in range(30) if rule.matches(f"model.layers.{i}.mlp.down_proj", i)]
    assert hits == [0, 1, 5, 28, 29]


def test_a_fallback_takes_the_layers_the_config_cannot():
    r = recipe(
        [{"modules": "*", "layers": "0:", "config": "k", "fallback": "w5", "name": "all"}],
        configs={"k": {"w_bit": 4, "group_size": 32, "scale_type": "k6"},
                 "w5": {"w_bit": 5, "group_size": 32, "zero_point": False}},
    )  # fmt: skip
    plan = r.resolve([("model.layers.0.a", 0, 512), ("model.layers.0.b", 0, 576)])
    assert plan["model.layers.0.a"].tag == "q4_k"
    assert plan["model.layers.0.b"].tag == "w5g32-sym"
    strict = recipe([{"modules": "*", "layers": "0:", "config": "k", "name": "all"}],
                    configs={"k": {"w_bit": 4, "group_size": 32, "scale_type": "k6"}})  # fmt: skip
    with pytest.raises(ValueError, match="rule 'all'.*in_features=576"):
        strict.resolve([("model.layers.0.b", 0, 576)])


@pytest.mark.parametrize("bad", ["a:b", "5:2", "1-3", -1])
def test_parse_layers_rejects(bad):
    with pytest.raises(ValueError, match="layers="):
        parse_layers(bad)


def test_unknown_config_names_the_rule():
    with pytest.raises(ValueError, match=r"rule 'mine' names unknown quant config 'w9'"):
        recipe([{"modules": "*", "config": "w9", "name": "mine"}])
    with pytest.raises(ValueError, match="the recipe default names unknown quant config"):
        recipe([], default="nope")


def test_rule_matching_nothing_is_an_error():
    r = recipe([{"modules": "*.gate_proj", "config": "quant"}])
    with pytest.raises(ValueError, match=r"rule '\*\.gate_proj'.*matches no linear layer"):
        r.resolve(LINEARS)
    r = recipe([{"modules": "*", "layers": "5:", "config": "quant"}])
    with pytest.raises(ValueError, match="matches no linear layer"):
        r.resolve(LINEARS)


def test_group_size_not_dividing_names_rule_and_layer():
    r = recipe(
        [{"modules": "*.down_proj", "config": "g48", "name": "down48"}],
        configs={"g48": {"w_bit": 4, "group_size": 48}},
    )
    with pytest.raises(
        ValueError, match=r"rule 'down48'.*in_features=128 of layer 'model.layers.0.mlp.down_proj'"
    ):
        r.resolve(LINEARS)


def test_bad_rule_fields():
    with pytest.raises(TypeError):
        recipe([{"modules": "*", "config": "quant", "layer": 3}])
    with pytest.raises(ValueError, match="bad regex"):
        recipe([{"modules": "re:([", "config": "quant"}])
    with pytest.raises(ValueError, match="unknown recipe key"):
        Recipe.from_dict({"rule": []})
