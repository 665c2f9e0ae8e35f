"""Evaluation: metrics (pure functions), answer extraction, perplexity, the runner, history and reports.

Submodules are imported where they are used, so `import lorakit.evaluate.metrics` stays light
(no torch, no matplotlib).
"""
