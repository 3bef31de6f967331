"""Measures of representations, layer by layer: linear probes, numerical rank, CKA, class variance, and the
tunnel-start rule read off a probe profile. Tensor maths on models and device data; no files written."""
