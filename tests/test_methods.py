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


def test_every_step_can_quantize_one_linear_alone():
    """The sensitivity stage estimates with any method: each step has its one-linear form."""
    from ptqflow.methods import ROUNDING, STEPS
    from ptqflow.methods.alone import ROUNDINGS, TRANSFORMS

    for name, step in STEPS.items():
        table = ROUNDINGS if step.kind == ROUNDING else TRANSFORMS
        assert name in table, (name, step.kind)
    assert set(ROUNDINGS) | set(TRANSFORMS) == set(STEPS)


def test_awq_then_gptq_alone_rounds_the_scaled_weights_against_the_scaled_inputs():
    """AWQ + GPTQ on one linear is GPTQ on ``W diag(s)`` with the Hessian of ``x / s`` (built
    here from the scaled tokens), mapped back by ``1 / s``."""
    import torch

    from ptqflow.methods.alone import Settings, awq_scale, method_error
    from ptqflow.methods.gptq.solve import gptq_round
    from ptqflow.quant import QuantSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64)
    x[:, [3, 40]] *= 20  # outlier channels: AWQ scales them
    w = torch.randn(16, 64, generator=g, dtype=torch.float64)
    h, x_mean, spec = 2 * x.T @ x / len(x), x.abs().mean(0), QuantSpec(3, 32)
    s = awq_scale(w, h, x_mean, spec, Settings())
    assert not torch.equal(s, torch.ones_like(s))
    xs = x / s
    cfg = Settings().gptq
    want = (
        gptq_round(
            w * s,
            2 * xs.T @ xs / len(xs),
            spec,
            percdamp=cfg.percdamp,
            act_order=cfg.act_order,
            static_groups=cfg.static_groups,
            ranges=cfg.ranges,
        )
        .dequantize()
        .double()
        / s
        - w
    )
    got = method_error("awq_gptq", w, h, x_mean, spec, Settings())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
