"""Stage recipe: the per-linear recipe; with recipe=auto, allocated under a bit budget from
the sensitivity table.

    python stages/recipe.py recipe=auto recipe.budget=3.5 pack=ptqflow

Body: :mod:`ptqflow.pipeline.recipe`.
"""

from _hydra import stage_main

from ptqflow.pipeline import recipe

main = stage_main(recipe.run)

if __name__ == "__main__":
    main()
