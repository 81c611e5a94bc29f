"""Measuring a trained crosscoder.

classify.py (`xc classify`: shared, exclusive, mixed, dead, Latent Scaling), latent_stats.py
(per-latent statistics from one pass over a store), coherence.py (functional coherence
across layers), reconstruction.py (FVU, L0, latents that fire), evaluate.py (`xc eval`),
splice.py (spliced-in next-token loss), plots.py (classify's figures), config.py (the
options of classify and eval, no torch).
"""
