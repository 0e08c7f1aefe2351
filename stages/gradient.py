"""Stage gradient: forward/backward over the calibration blocks, reduced to per-linear and
per-token gradient statistics.

    python stages/gradient.py sensitivity.batch_size=2

Body: :mod:`ptqflow.pipeline.gradient`.
"""

from _hydra import stage_main

from ptqflow.pipeline import gradient

main = stage_main(gradient.run)

if __name__ == "__main__":
    main()
