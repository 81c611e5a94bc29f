"""The language-model side: Hugging Face models, offline.

config.py (model arguments, dtypes, sites, and the options of `xc amplify`; no torch),
models.py (every read of a model folder: config, weights, tokenizer, loading),
sites.py (where in a model activations are read or edited), amplify.py (`xc amplify`:
logit diff amplification and latent steering).
"""
