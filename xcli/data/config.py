"""The options of `xc harvest` and `xc synth`, and the choices a store offers.

No torch or zarr here: `xc --help` reads these declarations (xcli.options), and the
store (xcli.data.store) takes its choices from here.
"""

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from xcli import remote
from xcli.errors import BadInput
from xcli.lm.config import MODEL_DTYPES, SITES, ModelSpec, check_device, check_dtype, device_option, parse_layers
from xcli.options import count, name_list, option, overwrite_option, pair
from xcli.source import SOURCE_NAME

# bfloat16 is not a Zarr dtype: its bits are stored losslessly as uint16 and widened on read.
STORAGE_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
CODECS = ("none", "zstd", "blosc-lz4")
# Chosen by benchmarks/store_codecs.py: see the figures in benchmarks/README.md.
DEFAULT_CHUNK_ROWS = 4096
DEFAULT_CODEC = "none"


def chunk_rows_option(help: str = "Token rows per Zarr chunk: the unit of reading, writing and resuming."):
    return option(DEFAULT_CHUNK_ROWS, help, metavar="N", parse=count)


def codec_option(help: str):
    return option(DEFAULT_CODEC, help, choices=CODECS)


def describe_data(data: str) -> str:
    """The identity of a --data argument: an absolute path, '-' or a dataset name."""
    if data == "-":
        return "-"
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else data


def data_content(data: str) -> str | None:
    """SHA-256 of the text a --data argument names (a file, or a folder's .txt files with their names),
    so that a resume refuses a corpus edited since the store was started. None for stdin and dataset
    names (a dataset in the local cache is identified by its name and split)."""
    path = Path(data).expanduser()
    if data == "-" or not path.exists():
        return None
    parts = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    return _content_hash(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in parts), str(path))


@functools.lru_cache(maxsize=8)
def _content_hash(parts: tuple, root: str) -> str:
    """Hashed once per process for the same files, sizes and times (a harvest asks more than once)."""
    digest = hashlib.sha256()
    for name, _, _ in parts:
        digest.update(f"\n{Path(name).relative_to(root) if name != root else ''}\n".encode())
        with open(name, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# -- xc harvest ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HarvestConfig:
    models: tuple[ModelSpec, ...] = option(
        help="A Hugging Face model: a local folder or a hub id already in the local cache (xc never downloads). "
             "Repeat for several models (model diffing): all see the same tokens and must share one vocabulary. "
             "ALIAS names the model in the store (default: the folder name).",
        flags=("-m", "--model"), metavar="[ALIAS=]ID_OR_PATH[@REVISION]", multiple=True)
    data: str = option(
        help="The corpus: a text file with one document per line, a .jsonl file (see --text-field), a folder of "
             ".txt files (one document each), - for stdin, or a Hugging Face dataset name from the local cache "
             "when the 'datasets' package is installed.", flags=("-d", "--data"), metavar="FILE|DIR|NAME|-")
    output: Path = option(help="The activation store to write (a folder, see xc-store(5)).",
                          flags=("-o", "--output"), metavar="STORE")
    layers: str | None = option(
        None, "Blocks to read, counted from 0: 6, 4-8 (inclusive), 0,3,6 or all. Needed by the named sites and "
              "by module paths containing {layer}.", flags=("-l", "--layers"), metavar="SPEC")
    sites: tuple[str, ...] = option(
        ("resid_post",), "What to read at each layer, repeatable: resid_post (output of block L; for the last "
        "block this is before the final norm), resid_pre (input of block L), attn_out or mlp_out (what the "
        "attention or MLP sublayer adds to the residual stream), or a MODULE.PATH whose output is read, e.g. "
        "h.3.mlp.c_fc; {layer} in a path is replaced by each layer.", flags=("-s", "--site"), metavar="SITE",
        multiple=True)
    context_length: int | None = option(
        None, "Tokens per window, special tokens included. Documents are packed into windows with EOS between "
              "them; longer ones continue in the next window. Default: 1024, or less if a model accepts fewer "
              "positions.", flags=("-c", "--context-length"), metavar="N")
    tokens: int | None = option(
        None, "Stop after storing N token rows (500k, 10M and 1G are accepted). Default: the whole corpus. A "
              "corpus with fewer tokens is stored whole, with a warning.", flags=("-t", "--tokens"), metavar="N",
        parse=count)
    batch_size: int = option(8, "Windows per forward pass.", flags=("-b", "--batch-size"), metavar="N")
    dtype: str = option("auto", "Dtype the models compute in; auto keeps the dtype they were saved in.",
                        choices=("auto", *MODEL_DTYPES))
    store_dtype: str = option(
        "auto", "Dtype of the stored activations. auto: bfloat16 when a model computes in bfloat16 (stored "
                "losslessly as its bits), else float16. Values beyond the float16 range stop the run with an "
                "error; they are never stored as inf.", choices=("auto", *STORAGE_DTYPES))
    device: str = device_option("the models run")
    text_field: str = option("text", "Field holding the text in .jsonl records and dataset rows.")
    split: str = option("train", "Dataset split, for dataset names.")
    keep_special_tokens: bool = option(
        False, "Also store rows of BOS, EOS and other special tokens (their large norms can dominate training). "
               "Padding is never stored.")
    align: bool = option(
        False, "Models with different tokenizers (or widths): run each on the same documents with its own "
               "tokenizer and store only rows that end at the same character in every model's tokenization, "
               "one row per aligned span, with each model's own token ids and the span's characters (see "
               "xc-store(5)). Needs fast tokenizers; windows hold one document each. Without it, models must "
               "share one vocabulary.")
    chunk_rows: int = chunk_rows_option()
    codec: str = codec_option("Chunk compression. Activations compress little (about 1.1x for float16); zstd "
                              "saves some disk at a large cost in read speed.")
    resume: bool = option(False, "Continue an incomplete store written with the same arguments, or start it if "
                                 "it is missing. The result equals an uninterrupted run.")
    overwrite: bool = overwrite_option("an existing store")
    storage_options: tuple = remote.storage_options_option()

    def __post_init__(self):
        models = tuple(ModelSpec.parse(m) if isinstance(m, str) else m for m in self.models)
        object.__setattr__(self, "models", models)  # accept strings from Python callers
        remote.configure(self.storage_options)  # before any store is opened
        object.__setattr__(self, "output", remote.location(self.output) if remote.is_url(self.output)
                           else Path(self.output))
        object.__setattr__(self, "sites", tuple(self.sites))
        if not models:
            raise BadInput("give at least one --model")
        aliases = [m.alias for m in models]
        repeated = sorted({a for a in aliases if aliases.count(a) > 1})
        if repeated:
            raise BadInput(f"two models are both called {repeated[0]!r}; name them with ALIAS=ID_OR_PATH")
        if not self.sites:
            raise BadInput("give at least one --site")
        for site in self.sites:
            if site not in SITES and not all(part.isidentifier() or part.isdigit() or part == "{layer}"
                                             for part in site.split(".")):
                raise BadInput(f"site {site!r} is not valid; use {', '.join(SITES)} or a module path "
                               f"such as h.6.mlp")
        needs_layers = [s for s in self.sites if s in SITES or "{layer}" in s]
        if needs_layers and self.layers is None:
            raise BadInput(f"site {needs_layers[0]!r} needs --layers (e.g. 6, 4-8, 0,3,6 or all)")
        if self.layers is not None:
            parse_layers(self.layers)  # syntax now; the range once the models are loaded
        for name in ("context_length", "tokens", "batch_size", "chunk_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        if self.context_length is not None and self.context_length < 2:
            raise BadInput(f"--context-length must be at least 2, not {self.context_length}")
        check_dtype(self.dtype)
        choices = {"store_dtype": ("auto", *STORAGE_DTYPES), "codec": CODECS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise BadInput(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not valid; "
                               f"use one of {', '.join(valid)}")
        check_device(self.device)
        if self.resume and self.overwrite:
            raise BadInput("--resume and --overwrite exclude each other: continue the store, or replace it")
        if self.align and self.keep_special_tokens:
            raise BadInput("--align and --keep-special-tokens exclude each other: special tokens stand for no "
                           "text, so they have no aligned rows")

    def identity(self) -> dict:
        """What makes two runs produce the same store: compared on --resume and on re-runs."""
        def model_id(spec):
            path = Path(spec.id).expanduser()
            return str(path.resolve()) if path.is_dir() else spec.id

        fields = ("layers", "sites", "context_length", "tokens", "batch_size", "dtype", "store_dtype",
                  "text_field", "split", "keep_special_tokens", "chunk_rows", "codec")
        return {
            "models": [{"alias": m.alias, "id": model_id(m), "revision": m.revision} for m in self.models],
            "data": describe_data(self.data),
            "data_content": data_content(self.data),
            **{name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in fields},
            **({"align": True} if self.align else {}),  # absent otherwise: stores written before --align resume
        }


# -- xc synth ------------------------------------------------------------------------------------------

def frequency_weights(frequencies: str, n: int):
    """Unnormalised firing weights of features 0..n-1 for a --frequencies value."""
    import numpy as np  # here, not at the top: `xc --help` reads this module and needs no numpy

    kind, _, value = frequencies.partition(":")
    g = np.arange(n, dtype=np.float64)
    try:
        if kind == "uniform" and not value:
            return np.ones(n)
        if kind == "exponential" and 0 < float(value) <= 1:
            return float(value) ** g
        if kind == "zipf" and float(value) >= 0:
            return (g + 1) ** -float(value)
    except ValueError:
        pass
    raise BadInput(f"--frequencies {frequencies!r} is not valid; use uniform, exponential:LAMBDA "
                   f"(0 < LAMBDA <= 1) or zipf:S (S >= 0)")


@dataclass(frozen=True)
class SynthSpec:
    """What `xc synth` plants. Counts of exclusive and scaled features are per model."""

    models: tuple[str, ...] = option(("a", "b"), "Comma-separated model names; sources are MODEL.synthetic.LAYER.",
                                     metavar="NAMES", parse=name_list)
    layers: int = option(1, "Layers per model.")
    width: int = option(32, "Width of every source.")
    shared: int = option(48, "Features present in every model with equal norm.")
    exclusive: int = option(16, "Features present in one model only, per model.")
    scaled: int = option(0, "Features present in every model with norm --scale in one of them, per model.")
    scale: float = option(0.3, "Norm of a scaled feature in its model; 1 in the others.")
    model_angle: float = option(0.0, "Degrees between a feature's directions in any two models (0: the same "
                                     "direction).")
    span: tuple[int, int] | None = option(None, "Layers a feature spans, a contiguous range of uniform length in "
                                                "MIN..MAX (default 1-LAYERS).", metavar="MIN-MAX",
                                          parse=pair("-", int, "MIN-MAX"))
    drift: float = option(0.0, "Degrees a feature's direction turns per layer inside its span.")
    active: float = option(4.0, "Expected number of features firing per token.")
    frequencies: str = option("uniform", "Firing probabilities: uniform, exponential:LAMBDA (p_g ~ LAMBDA^g) or "
                                         "zipf:S (p_g ~ 1/(g+1)^S), in a random order over the features.",
                              metavar="DIST")
    magnitude: tuple[float, float] = option((0.5, 1.5), "A firing feature's coefficient is uniform in [LOW, HIGH].",
                                            metavar="LOW,HIGH", parse=pair(",", float, "LOW,HIGH"))
    correlation: float = option(0.0, "Features in groups of --group-size fire together through a Gaussian "
                                     "copula of this correlation; each keeps its firing probability.")
    group_size: int = option(4, "Features per correlated group.")
    noise: float = option(0.0, "Standard deviation of Gaussian noise on every coordinate.")
    trigger: float = option(
        0.0, "Tie every exclusive feature to a shared feature (its trigger): it fires only when the trigger fires, "
             "on this fraction of the trigger's firings (0: exclusive features fire on their own). 1 plants a "
             "model-specific change that always comes with a shared concept, as a fine-tune's trigger word does: "
             "a plain crosscoder can absorb it into one latent whose decoders differ between the models.")
    hierarchy: tuple[int, int] | None = option(
        None, "Hierarchical features: the first PARENTS x (1 + CHILDREN) shared features form PARENTS trees, a "
              "parent followed by its CHILDREN children. Children are mutually exclusive (at most one of a parent's "
              "children fires on a token, each with its own probability) and a parent fires whenever one of its "
              "children does, and also on its own with its drawn probability. A crosscoder may then absorb the "
              "parent into its children's latents (feature absorption; Matryoshka crosscoders resist it).",
        metavar="PARENTS,CHILDREN", parse=pair(",", int, "PARENTS,CHILDREN"))
    tokens: int = option(65536, "Rows to write.", metavar="N", parse=count)
    seed: int = option(0, "Everything random derives from it.")

    def __post_init__(self):
        for f in dataclasses.fields(self):  # NaN passes every comparison below: refuse it first
            values = getattr(self, f.name) if isinstance(getattr(self, f.name), tuple) else (getattr(self, f.name),)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise BadInput(f"--{f.name.replace('_', '-')} {','.join(map(str, values))} must be finite")
        models = tuple(self.models)
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "magnitude", tuple(float(x) for x in self.magnitude))
        span = tuple(int(x) for x in self.span) if self.span is not None else (1, self.layers)
        object.__setattr__(self, "span", span)
        if not models:
            raise BadInput("--models names no model; give one or more names, separated by commas")
        if len(set(models)) != len(models):
            raise BadInput(f"--models {','.join(models)!r} repeats a name")
        for m in models:
            if not SOURCE_NAME.match(m):
                raise BadInput(f"model name {m!r} is not valid; use letters, digits, '_', '.' and '-'")
        for name in ("layers", "width", "tokens", "group_size"):
            if getattr(self, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        for name in ("shared", "exclusive", "scaled"):
            if getattr(self, name) < 0:
                raise BadInput(f"--{name} {getattr(self, name)} must be 0 or more")
        if self.n_features == 0:
            raise BadInput("the spec plants no feature; give --shared, --exclusive or --scaled above 0")
        if self.scaled and len(models) < 2:
            raise BadInput("--scaled features change norm between models; they need two or more --models")
        if not 0 <= self.scale <= 1 or (self.scaled and self.scale == 1):
            raise BadInput(f"--scale {self.scale} must be in [0, 1)")
        if not 0 <= self.model_angle <= 90:
            raise BadInput(f"--model-angle {self.model_angle} must be between 0 and 90 degrees")
        if not 0 <= self.drift <= 90:
            raise BadInput(f"--drift {self.drift} must be between 0 and 90 degrees per layer")
        if not 1 <= span[0] <= span[1] <= self.layers:
            raise BadInput(f"--span {span[0]}-{span[1]} must satisfy 1 <= MIN <= MAX <= --layers ({self.layers})")
        if self.width < len(models) + 2 and (self.model_angle or self.drift):
            raise BadInput(f"--width {self.width} is too small for --model-angle/--drift with {len(models)} models; "
                           f"use at least {len(models) + 2}")
        low, high = self.magnitude
        if not 0 <= low <= high or high <= 0:
            raise BadInput(f"--magnitude {low},{high} must be LOW,HIGH with 0 <= LOW <= HIGH and HIGH > 0")
        if not 0 <= self.correlation < 1:
            raise BadInput(f"--correlation {self.correlation} must be in [0, 1)")
        if self.noise < 0:
            raise BadInput(f"--noise {self.noise} must be 0 or more")
        if not 0 <= self.trigger <= 1:
            raise BadInput(f"--trigger {self.trigger} must be between 0 and 1")
        if self.trigger and not (self.shared and self.exclusive):
            raise BadInput("--trigger ties exclusive features to shared ones; it needs --shared and --exclusive "
                           "above 0")
        if self.hierarchy is not None:
            parents, children = hierarchy = tuple(int(x) for x in self.hierarchy)
            object.__setattr__(self, "hierarchy", hierarchy)
            if parents < 1 or children < 1 or parents * (1 + children) > self.shared:
                raise BadInput(f"--hierarchy {parents},{children} must be PARENTS,CHILDREN of at least 1 each, "
                               f"with PARENTS x (1 + CHILDREN) at most --shared ({self.shared})")
        weights = frequency_weights(self.frequencies, self.n_features)  # checks the syntax
        if not 0 < self.active or self.active * weights.max() / weights.sum() > 1:
            limit = weights.sum() / weights.max()
            raise BadInput(f"--active {self.active} must be positive and at most {limit:.4g} with "
                           f"--frequencies {self.frequencies} and {self.n_features} features "
                           f"(the most frequent feature would fire on more than every token)")

    @property
    def n_features(self) -> int:
        return self.shared + len(self.models) * (self.exclusive + self.scaled)

    def source_names(self) -> list[str]:
        return [f"{m}.synthetic.{layer}" for m in self.models for layer in range(self.layers)]

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SynthStore:
    """How `xc synth` writes its store (the keywords of xcli.data.synth.generate)."""

    chunk_rows: int = chunk_rows_option("Rows per Zarr chunk.")
    dtype: str = option("float32", "Storage dtype of the activations.", choices=tuple(STORAGE_DTYPES))
    codec: str = codec_option("Compression of the activation chunks.")
    overwrite: bool = overwrite_option("STORE and its truth if they exist")
    storage_options: tuple = remote.storage_options_option()
