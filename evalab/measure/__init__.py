"""The measuring engine and the analyses built on it: Monte Carlo (bias, variance, gap with intervals), the
per-key attribution, the gradient gap, the end-to-end model gap, closed-form theory and the cost model.
Public names are re-exported at the top: ``ev.monte_carlo``, ``ev.model_gap``, ``ev.theory``..."""
