"""Stage sensitivity: estimated loss increase of every decoder linear at every candidate
config, and its heatmap.

    python stages/sensitivity.py 'sensitivity.candidates=[skip,w4g64,w3g64]'

Body: :mod:`ptqflow.pipeline.sensitivity`.
"""

from _hydra import stage_main

from ptqflow.pipeline import sensitivity

main = stage_main(sensitivity.run)

if __name__ == "__main__":
    main()
