"""Following features across model releases (`xc track`).

assign.py (the Hungarian algorithm, and the maximum-weight matching above a threshold),
match.py (matching two crosscoders' latents through a release both read), registry.py (the
SQLite or PostgreSQL registry and its migrations, xc-registry(5)), chain.py (statuses, adding
a crosscoder, names, queries), config.py (the options of `xc track`, no torch).
"""
