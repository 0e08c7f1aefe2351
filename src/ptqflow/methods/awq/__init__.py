"""AWQ: activation-aware scale search and clip search, one decoder block at a time.

- :mod:`ptqflow.methods.awq.scale`: the per-channel scale search and its result type (saved
  per block).
- :mod:`ptqflow.methods.awq.clip`: the weight clip-range search and its result type.
- :mod:`ptqflow.methods.awq.apply`: folding scales and clamping clips into a model.

Both searches run inside :func:`ptqflow.blockwise.run_resumable`, which streams the model one
block at a time and keeps per-block results so a killed run resumes.
"""
