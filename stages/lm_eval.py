"""Stage lm-eval: lm-eval tasks on the model of one evaluation method.

    python stages/lm_eval.py eval.method=awq
    python stages/lm_eval.py eval.method=rtn --multirun quant=w3g64,w4g64

Body: :mod:`ptqflow.pipeline.lm_eval`.
"""

from _hydra import stage_main

from ptqflow.pipeline import lm_eval

main = stage_main(lm_eval.run)

if __name__ == "__main__":
    main()
