"""The options of `xc import`: one declaration each (xcli.options), no torch."""

import re
from dataclasses import dataclass
from pathlib import Path

from xcli.errors import BadInput
from xcli.options import option, overwrite_option

FORMATS = ("auto", "dictionary-learning", "crosscode", "gemma-scope", "saelens")
SOURCE_SPEC = re.compile(r"^(?:(?P<name>[^=:]+)=)?(?P<model>[^:]+):(?P<site>[^:]+)(?::(?P<layer>\d+))?$")


def source_spec(text: str) -> tuple[str | None, str, str, int | None]:
    """'[NAME=]MODEL:SITE[:LAYER]' -> (name or None, model, site, layer or None)."""
    m = SOURCE_SPEC.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a source written [NAME=]MODEL:SITE[:LAYER] (e.g. base:resid_post:13 or "
                         f"chat.resid_post.13=google/gemma-2-2b-it:resid_post:13)")
    layer = m.group("layer")
    return m.group("name"), m.group("model"), m.group("site"), None if layer is None else int(layer)


@dataclass(frozen=True)
class ImportConfig:
    path: Path = option(help="The published dictionary: a state dict (.pt, loaded weights-only), a .safetensors "
                             "or .npz file, or a folder (SAELens: cfg.json + sae_weights.safetensors; "
                             "dictionary_learning on the hub: config.json + model.safetensors; crosscode: model.pt + "
                             "model_cfg.yaml; Gemma Scope: params.npz, or params.safetensors + config.json).",
                        argument=True, metavar="PATH")
    output: Path = option(help="The xc checkpoint to write (.safetensors).", flags=("-o", "--output"),
                          metavar="CHECKPOINT")
    format: str = option("auto", "The layout of PATH; auto tells it from the tensor names and config files, and "
                                 "refuses what it does not recognise.", choices=FORMATS)
    sources: tuple[tuple, ...] = option(
        (), "What each of the dictionary's layers is, in its own order: the model, the site (an xc site such as "
            "resid_post, or a module path) and the layer; NAME is the source's name in xc (default "
            "MODEL.SITE.LAYER, as xc harvest names them). Needed for dictionary_learning crosscoders, which do "
            "not record it, and Gemma Scope's params.npz (one for an SAE, two for a transcoder); SAELens records "
            "it, crosscode in the experiment_config.yaml above its step folders and Gemma Scope 2 in config.json "
            "(--source then overrides: the input, then a transcoder's output; crosscode: model-major).",
        flags=("--source",), metavar="[NAME=]MODEL:SITE[:LAYER]", multiple=True, parse=source_spec)
    k: int | None = option(None, "BatchTopK's k for a dictionary that does not record it (a SAELens JumpReLU whose "
                                 "thresholds are one BatchTopK threshold, as SAELens saves BatchTopK SAEs: with K it "
                                 "becomes BatchTopK, without it JumpReLU). Only training-time selection uses k; "
                                 "inference uses the threshold.", metavar="K")
    overwrite: bool = overwrite_option("CHECKPOINT if it exists")

    def __post_init__(self):
        for name in ("path", "output"):
            value = getattr(self, name)
            if not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        sources = tuple(source_spec(s) if isinstance(s, str) else tuple(s) for s in self.sources)
        object.__setattr__(self, "sources", sources)
        if self.format not in FORMATS:
            raise BadInput(f"--format {self.format!r} is not known; use one of {', '.join(FORMATS)}")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise BadInput(f"--k must be a whole number of at least 1, not {self.k!r}")
