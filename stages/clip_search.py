"""Stage clip-search: AWQ's weight clip ranges per output channel and group (resumable).

    python stages/clip_search.py search.clip.max_shrink=0.3

Body: :mod:`ptqflow.pipeline.clip_search`.
"""

from _hydra import stage_main

from ptqflow.pipeline import clip_search

main = stage_main(clip_search.run)

if __name__ == "__main__":
    main()
