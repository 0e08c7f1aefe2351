"""The embedded default model on the default wiki protocol: the pipeline's figures against an
independent computation (tests/reference_ppl.py: plain transformers, naive RTN), and that
computation against the published reference figures (README, "What runs today": FP 13.11,
RTN W4g64 17.19, RTN W3g64 45.9, measured with plain transformers in fp32).
Slow (~10 min on 2 cores)."""

import pytest
from conftest import compose
from reference_ppl import reference_perplexity

from ptqflow.pipeline import fake_quant_eval


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, bits, reference, tol",
    [
        (["eval.method=fp"], None, 13.11, 0.01),
        (["quant=w4g64"], 4, 17.19, 0.01),
        (["quant=w3g64"], 3, 45.9, 0.1),
    ],
    ids=["fp", "rtn-w4g64", "rtn-w3g64"],
)
def test_embedded_default_reproduces_reference_perplexity(
    tmp_path, overrides, bits, reference, tol
):
    independent = reference_perplexity(bits)
    assert independent == pytest.approx(reference, abs=tol)
    cfg = compose([*overrides, f"paths.reports={tmp_path}", "tracking=none"])
    pipeline = fake_quant_eval.run(cfg)["perplexity"]
    print(f"{overrides}: pipeline {pipeline:.4f}, independent {independent:.4f}, ref {reference}")
    assert pipeline == pytest.approx(independent, abs=0.01)
