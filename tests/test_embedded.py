"""The embedded default model on the default wiki protocol, against the figures measured with
transformers in fp32 (DESIGN.md): FP 13.11, RTN W4g64 17.19, RTN W3g64 45.9. Slow (~5 min)."""

import fake_quant_eval
import pytest
from conftest import compose


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, expected, tol",
    [
        (["eval.method=fp"], 13.11, 0.01),
        (["quant=w4g64"], 17.19, 0.01),
        (["quant=w3g64"], 45.9, 0.1),
    ],
    ids=["fp", "rtn-w4g64", "rtn-w3g64"],
)
def test_embedded_default_reproduces_reference_perplexity(tmp_path, overrides, expected, tol):
    cfg = compose([*overrides, f"paths.reports={tmp_path}", "tracking=none"])
    assert fake_quant_eval.run(cfg)["perplexity"] == pytest.approx(expected, abs=tol)
