"""Quantization methods that choose their own integers, one package each."""
