"""Stage fake-quant-eval: perplexity of the model FP (``eval.method=fp``), RTN, AWQ or packed.

    python stages/fake_quant_eval.py eval.method=awq
    python stages/fake_quant_eval.py --multirun quant.w_bit=3,4 quant.group_size=32,64

Body: :mod:`ptqflow.pipeline.fake_quant_eval`.
"""

from _hydra import stage_main

from ptqflow.pipeline import fake_quant_eval

main = stage_main(fake_quant_eval.run)

if __name__ == "__main__":
    main()
