"""GPTQ (Frantar et al., 2022): error-compensating rounding, one decoder block at a time.

- :mod:`ptqflow.methods.gptq.solve`: the Hessian and the rounding of one linear.
- :mod:`ptqflow.methods.gptq.block`: one block (true sequential), its saved result and how a
  model takes it back.
- :mod:`ptqflow.methods.gptq.config`: the ``gptq`` config section.
"""
