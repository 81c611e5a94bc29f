"""The options of `xc export`: one declaration each (xcli.options), no torch."""

import re
from dataclasses import dataclass
from pathlib import Path

from xcli import remote
from xcli.errors import BadInput
from xcli.export import neuronpedia_schema as npd
from xcli.lm.config import check_device, device_option
from xcli.options import option, overwrite_option, pair

FORMATS = ("neuronpedia", "saelens", "circuit-tracer")


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path = option(help="The crosscoder checkpoint; - reads its path from stdin.", argument=True,
                              metavar="[CHECKPOINT|-]")
    output: Path = option(help="Folder to write. Refused if it exists, unless --resume or --overwrite.",
                          flags=("-o", "--output"), metavar="DIR")
    store: Path | None = option(None, "Activation store to read the dashboards from (xc harvest output). Needed "
                                      "for --format neuronpedia.", metavar="STORE")
    format: str = option("neuronpedia", "neuronpedia: the v1 export layout (one Neuronpedia source per written "
                                        "(model, layer), same feature indices in all). saelens: one SAELens SAE "
                                        "folder per source slice. circuit-tracer: a transcoder set, one "
                                        "transcoder per layer (CHECKPOINT and --transcoder).", choices=FORMATS)
    model_ids: tuple[str, ...] = option(
        (), "Neuronpedia model id of a model of the crosscoder (e.g. base=gemma-2-2b); repeat per model. Default: "
            "the model's name, lowercased.", flags=("--model-id",), metavar="[MODEL=]ID", multiple=True)
    model_paths: tuple[str, ...] = option(
        (), "Where to read a model's config and unembedding (offline) for the logit lens. Default: the path or "
            "hub id recorded in the store (hub ids must be in the local Hugging Face cache).",
        flags=("--model-path",), metavar="[MODEL=]PATH", multiple=True)
    tokenizer: str | None = option(None, "Tokenizer for token strings. Default: the one recorded in the store, "
                                         "else the first model's.", metavar="PATH")
    set_name: str | None = option(None, "Neuronpedia source set (and release); source ids are LAYER-NAME. "
                                        "Default: xc-{latents}-{id}, e.g. xc-16k-3f9a0c21, where id is a hash of "
                                        "the checkpoint's tensors: unique per crosscoder, the same on every "
                                        "re-export. Activation ids derive from that hash either way.",
                                  metavar="NAME")
    features: str = option("all", "Latents to export: all, 7, 0-99 (inclusive) or a comma list such as 0-9,42.",
                           metavar="SPEC")
    top_k: int = option(20, "Top activating examples per feature (plus 5 samples in each of 5 activation "
                            "intervals).")
    batch_size: int = option(128, "Features per batch-N.jsonl.gz file. Raised (with a note) when a folder would "
                                  "hold more than 1000 files: Neuronpedia's importer lists at most 1000.")
    window: int = option(64, "Tokens shown per example: the example token, up to 3/4 of the window before it and "
                             "the rest after, never crossing into another document or context window.")
    classes: Path | None = option(None, "Output of `xc classify`: each latent's class and statistics go to "
                                        "xc-latents.jsonl and the class counts to Source.notes.",
                                  metavar="CLASSIFY.jsonl")
    vectors: bool = option(False, "Include each feature's decoder direction (raw units) as its steering vector. "
                                  "Large: d_model numbers per feature and source.")
    creator_id: str = option(npd.DEFAULT_CREATOR_ID, "Neuronpedia user id written as creatorId. Activations are "
                             "shown only for ids listed in the instance's PUBLIC_ACTIVATIONS_USER_IDS; the default "
                             "is one of them.")
    creator_name: str = option("xc", "creatorName of the release and source set.")
    transcoders: tuple[Path, ...] = option(
        (), "circuit-tracer: the transcoder of another layer, one xc checkpoint each (reading one source and "
            "writing another at the same layer); with CHECKPOINT they cover layers 0 to N-1 once each.",
        flags=("--transcoder",), metavar="CHECKPOINT", multiple=True)
    hooks: tuple[str, str] | None = option(
        None, "circuit-tracer: the TransformerLens hooks (inside blocks.L) the transcoders read and write. Default: "
              "from the sources' sites (resid_pre, resid_post, attn_out, mlp_out, or blocks.{layer}.HOOK).",
        metavar="IN,OUT", parse=pair(",", str, "IN,OUT (e.g. ln2.hook_normalized,hook_mlp_out)"))
    device: str = device_option("the crosscoder runs over the store")
    resume: bool = option(False, "Continue an unfinished export in DIR: finished batches are skipped.")
    overwrite: bool = overwrite_option("DIR if it exists")
    storage_options: tuple = remote.storage_options_option()

    def __post_init__(self):
        remote.configure(self.storage_options)  # before any store is opened
        for name in ("checkpoint", "output", "store", "classes"):
            value = getattr(self, name)
            if name == "store" and remote.is_url(value):
                object.__setattr__(self, name, remote.location(value))
            elif value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        for name in ("model_ids", "model_paths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.format not in FORMATS:
            raise BadInput(f"--format {self.format!r} is not known; use one of {', '.join(FORMATS)}")
        for name, low, high in (("top_k", 1, 1000), ("batch_size", 1, 65536), ("window", 1, npd.MAX_TOKENS)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise BadInput(f"--{name.replace('_', '-')} must be an integer from {low} to {high}, not {value!r}")
        if self.format == "neuronpedia" and self.store is None:
            raise BadInput("--store is needed for --format neuronpedia: the dashboards are read from activations")
        if self.set_name is not None and not valid_set_name(self.set_name):
            raise BadInput(f"--set-name {self.set_name!r} is not valid; use lowercase letters, digits, '-' and "
                           f"'_', starting and ending with a letter or digit (e.g. xc-16k)")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.creator_id):
            raise BadInput(f"--creator-id {self.creator_id!r} is not a Neuronpedia user id (letters and digits)")
        if not self.creator_name.strip():
            raise BadInput("--creator-name must not be empty")
        check_device(self.device)
        if (self.transcoders or self.hooks) and self.format != "circuit-tracer":
            raise BadInput("--transcoder and --hooks apply to --format circuit-tracer")
        if self.resume and self.overwrite:
            raise BadInput("--resume and --overwrite exclude each other: continue the export, or replace it")


def valid_set_name(name: str) -> bool:
    return bool(npd.SET_NAME.match(name)) and "--" not in name and "__" not in name and name != "neurons"
