"""Evaluation: metrics (pure functions), batched generation, reports, and the runner.

Submodules are imported where they are used, so `import lorakit.evaluate.metrics` stays light
(no torch, no matplotlib).
"""
