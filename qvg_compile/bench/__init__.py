"""Measuring the quantizers: video-like K/V to measure on (`synthetic`) and the comparison of every
method on the same K/V behind ``qvg-compile quant-bench`` (`compare`). Not part of the math layer:
they use it."""
