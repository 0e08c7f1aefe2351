"""Stage lm-eval: lm-eval tasks on the model of one evaluation method.

    python stages/lm_evaluation.py eval.method=awq
    python stages/lm_evaluation.py eval.method=rtn --multirun quant=w3g64,w4g64

Body: :mod:`ptqflow.pipeline.lm_evaluation`.
"""

from _hydra import stage_main

from ptqflow.pipeline import lm_evaluation

main = stage_main(lm_evaluation.run)

if __name__ == "__main__":
    main()
