"""xc: sparse crosscoders across layers and models.

The command line is `xc`; everything it does is a call into this package:

    xcli.data       activation stores, harvest (models over a corpus), synth (planted dictionaries)
    xcli.crosscoder the crosscoder module, its sparse path and kernels, fmxcoders, source parallel
    xcli.train      training (`from xcli.train import TrainConfig, train`)
    xcli.analysis   classify, eval, latent statistics, spliced-in loss, plots
    xcli.export     Neuronpedia and SAELens exports (`from xcli.export import ExportConfig, export`)
    xcli.lm         Hugging Face models, sites, amplify and steering
    xcli.cli        the `xc` command line, generated from the configs' option declarations
"""

import importlib
import importlib.abc
import importlib.util
import sys

from xcli.errors import BadInput, XcError
from xcli.version import __version__


def load(path, device="cpu"):
    """Open a crosscoder checkpoint (.safetensors) as a module with encode/decode."""
    from xcli.crosscoder.model import load as _load

    return _load(path, device)


# Module paths of xc 0.1, before the subpackages: `from xcli.harvest import harvest` keeps working
# and gives the module where the code lives now.
MOVED = {
    "xcli.store": "xcli.data.store", "xcli.loader": "xcli.data.loader", "xcli.corpus": "xcli.data.corpus",
    "xcli.harvest": "xcli.data.harvest", "xcli.synth": "xcli.data.synth", "xcli.sparse": "xcli.crosscoder.sparse",
    "xcli.kernels": "xcli.crosscoder.kernels", "xcli.fmx": "xcli.crosscoder.fmx",
    "xcli.split": "xcli.crosscoder.source_parallel", "xcli.classify": "xcli.analysis.classify",
    "xcli.latent_stats": "xcli.analysis.latent_stats", "xcli.coherence": "xcli.analysis.coherence",
    "xcli.evaluate": "xcli.analysis.evaluate", "xcli.splice": "xcli.analysis.splice",
    "xcli.plots": "xcli.analysis.plots", "xcli.neuronpedia": "xcli.export.neuronpedia_schema",
    "xcli.saelens": "xcli.export.saelens", "xcli.dashboards": "xcli.export.dashboards",
    "xcli.models": "xcli.lm.models", "xcli.sites": "xcli.lm.sites", "xcli.amplify": "xcli.lm.amplify",
    "xcli.manpage": "xcli.cli.manpage",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module it moved to (the same object, not a copy)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())

__all__ = ["__version__", "BadInput", "XcError", "load"]
