"""Stage check: the whole config checked in seconds, before DVC runs (and deletes the outputs
of) any other stage.

    python stages/check.py quant.w_bit=3 pack=ptqflow

Body: :mod:`ptqflow.pipeline.check`.
"""

from _hydra import stage_main

from ptqflow.pipeline import check

main = stage_main(check.run)

if __name__ == "__main__":
    main()
