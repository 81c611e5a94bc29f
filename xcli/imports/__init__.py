"""xc import: published dictionaries in their trainers' formats, as xc checkpoints.

    from xcli.imports import ImportConfig, import_dictionary
    import_dictionary(ImportConfig(path="model_final.pt", output="xc.safetensors",
                                   sources=("base:resid_post:13", "chat:resid_post:13")))  # -> Path

config.py declares the options; common.py reads foreign files without running their code;
dictionary_learning.py, crosscode.py, gemma_scope.py and saelens.py map one format each. The checkpoint's metadata gains an
"imported" object: the format, what each field became, and what was folded or recorded.
"""

from pathlib import Path

from xcli.errors import BadInput
from xcli.files import check_output, check_replaceable, output_lock
from xcli.imports.config import FORMATS, ImportConfig

KNOWN = ("a dictionary_learning CrossCoder or BatchTopKCrossCoder (a state dict .pt or .safetensors, or a hub "
         "folder with config.json and model.safetensors), a crosscode checkpoint folder (model.pt and "
         "model_cfg.yaml), a Gemma Scope or Gemma Scope 2 SAE or transcoder (params.npz, or params.safetensors with "
         "config.json), or a SAELens SAE or transcoder folder (cfg.json and sae_weights.safetensors)")


def detect(path: Path) -> str:
    """The format of `path` (dictionary-learning, crosscode, gemma-scope or saelens); anything else is one BadInput."""
    from xcli.imports import crosscode, dictionary_learning, gemma_scope, saelens
    from xcli.imports.common import TORCH_SUFFIXES, tensor_shapes

    if not path.exists():
        raise BadInput(f"{str(path)!r} does not exist")
    if saelens.recognises(path):
        return "saelens"
    if crosscode.is_folder(path):
        return "crosscode"
    if path.suffix == ".npz" or (path.is_dir() and gemma_scope.weights_file(path) is not None):
        weights = gemma_scope.weights_file(path)
        shapes = gemma_scope.npz_shapes(weights) if weights.suffix == ".npz" else tensor_shapes(weights)
        if gemma_scope.recognises(shapes):
            return "gemma-scope"
        raise BadInput(f"{str(path)!r} holds arrays of no known layout; xc imports {KNOWN}")
    if path.is_dir():
        weights = dictionary_learning.hub_weights(path)
        if weights is None:
            raise BadInput(f"{str(path)!r} is a folder of no known layout; xc imports {KNOWN}")
    elif path.suffix in TORCH_SUFFIXES + (".safetensors",):
        weights = path
    else:
        raise BadInput(f"{str(path)!r} has suffix {path.suffix or '(none)'!r}; xc imports {KNOWN}")
    shapes = tensor_shapes(weights)
    if dictionary_learning.recognises(shapes):
        return "dictionary-learning"
    if crosscode.recognises(shapes):
        return "crosscode"
    if gemma_scope.recognises(shapes):
        return "gemma-scope"
    raise BadInput(f"{str(path)!r} holds tensors of no known layout; xc imports {KNOWN}")


def import_dictionary(config: ImportConfig) -> Path:
    """Write config.path, read in config.format, as an xc checkpoint at config.output; returns its path."""
    from xcli.crosscoder import model as cc
    from xcli.imports import crosscode, dictionary_learning, gemma_scope, saelens

    with output_lock(config.output):
        check_output(config.output, overwrite=config.overwrite)
        if config.overwrite:
            check_replaceable(config.output, "checkpoint", [config.path])
        if not config.path.exists():
            raise BadInput(f"{str(config.path)!r} does not exist")
        fmt = detect(config.path) if config.format == "auto" else config.format
        converter = {"dictionary-learning": dictionary_learning, "crosscode": crosscode, "gemma-scope": gemma_scope,
                     "saelens": saelens}[fmt]
        imported = converter.convert(config.path, config.sources, config.k)
        return cc.save(imported.model, config.output, extra={"imported": imported.record}, overwrite=True)


__all__ = ["FORMATS", "ImportConfig", "detect", "import_dictionary"]
