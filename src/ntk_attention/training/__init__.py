"""Training, evaluation and comparison on HF Trainer: ``ntk-attn train`` / ``eval`` / ``compare``.

data.py (load, check, split, tokenize), models.py (load the base, apply a method, save/load the
result), fit.py (Trainer wiring), then one module per command: train.py, evaluate.py, and the package
compare/ (its parts: variants, runs, resume, report, provenance).
"""
