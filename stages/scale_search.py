"""Stage scale-search: AWQ's activation-aware per-channel scales, block by block (resumable).

    python stages/scale_search.py search=autoawq quant=w3g64

Body: :mod:`ptqflow.pipeline.scale_search`.
"""

from _hydra import stage_main

from ptqflow.pipeline import scale_search

main = stage_main(scale_search.run)

if __name__ == "__main__":
    main()
