"""The data side: activation stores and what fills them.

store.py (the Zarr activation store),
loader.py (training batches from stores), corpus.py (text to token windows), harvest.py
(`xc harvest`: models over a corpus into a store), synth.py (`xc synth`: stores with a
planted dictionary), config.py (the options of harvest and synth, no torch or zarr).
"""
