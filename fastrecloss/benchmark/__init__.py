"""Measurement code: the harness (``harness``: cases, peers, isolated timing and peak memory)
and the suites behind ``fastrecloss bench`` (``suites``). Uses the public API and the backends
(to name them as implementations); never ``recsys`` or ``cli``.
"""
