"""Calibrators, quantizers, QAT and the precision search."""
