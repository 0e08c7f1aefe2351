"""The method registry: step lists are checked, and the DAG's method stages follow from it."""

import pytest

from ptqflow.methods import METHODS, check_steps, method_of, method_outs, method_params
from ptqflow.pipeline.table import BY_NAME, SUBJECT_DEPS, SUBJECT_PARAMS


@pytest.mark.parametrize(
    ("names", "method"),
    [(["awq", "gptq"], "awq_gptq"), (["awq"], "awq"), (["awq", "rtn"], "awq"), (["rtn"], "rtn")],
)
def test_step_lists_name_their_method(names, method):
    assert method_of(names) == method


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            ["gptq", "awq"],
            r"awq change\(s\) the weights after gptq rounded them.*\['awq', 'gptq'\]",
        ),
        (["gptq", "rtn"], "round the weights 2 times"),
        (["awq", "awq"], "name a step twice"),
        (["smoothquant"], r"unknown method step\(s\) \['smoothquant'\]; known: \['awq', 'gptq'"),
    ],
)
def test_bad_step_lists_are_refused(names, message):
    with pytest.raises(ValueError, match=message):
        check_steps(names)


def test_every_method_has_its_stages_in_the_dag():
    for method in METHODS:
        assert set(method_params(method)) <= set(SUBJECT_PARAMS[method])
        assert set(method_outs(method)) <= set(SUBJECT_DEPS[method])
        for stage in (f"eval-{method}", f"lm-eval-{method}"):
            assert set(BY_NAME[stage].deps) >= set(method_outs(method))
        # real-pack may pack any method, so it reads every method's results
        assert set(method_outs(method)) <= set(BY_NAME["real-pack"].deps)
    # searched roundings get a stage of their own, writing what their evaluations read
    assert BY_NAME["awq-gptq"].outs == ("artifacts/awq_gptq",)
    assert {"artifacts/scales", "artifacts/clips"} <= set(BY_NAME["awq-gptq"].deps)
    assert "search" in BY_NAME["awq-gptq"].params and "gptq" in BY_NAME["awq-gptq"].params
    assert "search" not in BY_NAME["gptq"].params
