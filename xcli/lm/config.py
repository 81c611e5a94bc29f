"""How a user names models, dtypes, sites and layers, and the options of `xc amplify`.

No torch here: configs and `xc --help` read these without loading a model
(xcli.lm.models loads them, xcli.lm.sites finds the sites).
"""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from xcli.errors import BadInput
from xcli.options import option

ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")
MODEL_DTYPES = ("float32", "float16", "bfloat16")
"""Dtypes a language model computes in; `auto` is also accepted (its meaning differs by command)."""
SITES = ("resid_post", "resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True)
class ModelSpec:
    """One model argument: a short alias, a local path or hub id, and an optional revision."""

    alias: str
    id: str
    revision: str | None = None
    alias_given: bool = field(default=True, compare=False)
    """False when the alias was made from the path (no `ALIAS=` in the argument)."""

    @classmethod
    def parse(cls, text: str, allow_alias: bool = True) -> "ModelSpec":
        alias, rest = None, text
        head, sep, tail = text.partition("=")
        if allow_alias and sep and ALIAS.match(head) and not Path(text).exists():
            alias, rest = head, tail
        revision = None
        if "@" in rest and not Path(rest).exists():
            rest, revision = rest.rsplit("@", 1)
            if not revision:
                raise BadInput(f"model {text!r} has an empty revision after '@'")
        if not rest:
            raise BadInput(f"model {text!r} names no model; use [ALIAS=]ID_OR_PATH[@REVISION]")
        if alias is not None:
            return cls(alias, rest, revision)
        # A readable default: the last path component, made safe.
        made = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(rest.rstrip("/")).name).strip("-") or "model"
        return cls(made, rest, revision, alias_given=False)

    def __str__(self) -> str:
        return f"{self.alias}={self.id}" + (f"@{self.revision}" if self.revision else "")


def check_dtype(name: str) -> None:
    if name not in ("auto", *MODEL_DTYPES):
        raise BadInput(f"--dtype {name!r} is not valid; use one of auto, {', '.join(MODEL_DTYPES)}")


def parse_layers(spec: str, n: int | None = None) -> list[int]:
    """`6`, `4-8` (inclusive), `0,3,6`, `0,4-6` or `all`; checked against n layers when n is given."""
    spec = str(spec).strip()
    valid = "use e.g. 6, 4-8, 0,3,6 or all"
    if spec == "all":
        if n is None:
            return []
        return list(range(n))
    layers = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise BadInput(f"--layers {spec!r} is not a layer list; {valid}")
        lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if hi < lo:
            raise BadInput(f"--layers range {part.strip()!r} runs backwards; write it as {hi}-{lo}")
        layers += [x for x in range(lo, hi + 1) if x not in layers]
    if n is not None:
        for layer in layers:
            if layer >= n:
                raise BadInput(f"layer {layer} is out of range: the model has {n} layers, so use 0-{n - 1}")
    return sorted(layers)


# -- xc amplify ------------------------------------------------------------------------------------

def device_option(what: str):
    """--device: one declaration for every command that runs torch (checked by xcli.devices)."""
    return option("auto", f"Where {what}: auto picks the first CUDA GPU if there is one, else the CPU.",
                  metavar="auto|cpu|cuda[:N]")


def check_device(name: str) -> None:
    from xcli.devices import resolve_device  # torch: only when a config is built, never for --help

    resolve_device(name)


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn; shared by amplification and steering."""

    max_new_tokens: int = option(64, "Tokens generated per completion at most (a completion also ends at EOS).")
    temperature: float = option(1.0, "Sampling temperature; 0 is greedy decoding.")
    top_p: float = option(1.0, "Nucleus sampling: keep the most likely tokens whose mass first reaches P.")
    seed: int = option(0, "Sample S of prompt I uses a random stream fixed by (seed, I, S): the same for every "
                          "alpha/scale/clamp value and for any --batch-size.")
    n_samples: int = option(1, "Completions per prompt and value.")
    batch_size: int = option(16, "Completions decoded together (left-padded).")

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise BadInput(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise BadInput(f"--temperature {self.temperature} must be 0 (greedy) or positive")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"--top-p {self.top_p} must be in (0, 1]")
        if self.n_samples < 1:
            raise BadInput(f"--n-samples {self.n_samples} must be at least 1")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size {self.batch_size} must be at least 1")
        if not 0 <= self.seed < 2**63:
            raise BadInput(f"--seed {self.seed} must be between 0 and 2**63 - 1")


# What amplification and steering share, declared once: prompts, the count, where models run.

def prompts_option():
    return option(help="A prompt; repeatable.", flags=("--prompt",), metavar="TEXT", multiple=True)


def count_option():
    return option(None, "Search each completion for REGEX (Python syntax). Adds \"match\" to each line, then one "
                        "summary line per value with matches, n, rate and a 95% Wilson interval; the same summary "
                        "goes to stderr.", metavar="REGEX")


def model_dtype_option():
    return option("auto", "Model weights; auto is bfloat16 on a GPU that supports it, else float32. Logits are "
                          "combined in float32.", choices=("auto", *MODEL_DTYPES))


def token_ids_option():
    return option(False, "Also print the generated token ids (EOS included).")


def check_generation(config) -> None:
    """The checks of the shared fields, after each config's own."""
    object.__setattr__(config, "prompts", tuple(config.prompts))
    if not config.prompts:
        raise BadInput("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    if config.count is not None:
        try:
            re.compile(config.count)
        except re.error as e:
            raise BadInput(f"--count {config.count!r} is not a valid regular expression ({e})") from e
    check_dtype(config.dtype)
    check_device(config.device)


@dataclass(frozen=True)
class AmplifyConfig:
    """Logit diff amplification between a before-model and an after-model."""

    before: str = option(help="Model before the change (e.g. the base model): a local folder, or a hub id "
                         "already in the local Hugging Face cache, optionally ID@REVISION. Never downloaded.",
                         metavar="MODEL")
    after: str = option(help="Model after the change (e.g. the fine-tune); same forms as --before. Must share "
                        "the tokenizer (vocabularies are compared). A completion ends at an EOS id of either "
                        "model's generation config or of the tokenizer.", metavar="MODEL")
    alphas: tuple[float, ...] = option(help="Amplification factor: sample from after + A*(after - before). "
                                       "Repeat for a sweep. 0 reproduces --after and -1 reproduces --before "
                                       "(keep them as controls).", flags=("--alpha",), metavar="A", multiple=True)
    prompts: tuple[str, ...] = prompts_option()
    sampling: Sampling = field(default_factory=Sampling)
    count: str | None = count_option()
    device: str = device_option("the models run")
    dtype: str = model_dtype_option()
    token_ids: bool = token_ids_option()

    def __post_init__(self):
        object.__setattr__(self, "alphas", tuple(self.alphas))
        if not self.alphas:
            raise BadInput("give at least one --alpha")
        if not all(math.isfinite(a) for a in self.alphas):
            raise BadInput(f"--alpha values must be finite numbers, got {list(self.alphas)}")
        check_generation(self)


@dataclass(frozen=True)
class SteerConfig:
    """Generation from one model with crosscoder latents added (scale) or held (clamp)."""

    model: str = option(help="Steering: the model to steer. The checkpoint's sources whose \"model\" field "
                        "equals ALIAS (or, without an alias, the path or id as written, or the same folder) are "
                        "steered at their sites.", metavar="[ALIAS=]MODEL")
    checkpoint: str = option(help="Steering: an xc crosscoder checkpoint.", metavar="X.safetensors")
    latents: tuple[int, ...] = option(help="Steering: latent index to steer; repeat to steer several latents "
                                      "at once.", flags=("--latent",), metavar="I", multiple=True)
    prompts: tuple[str, ...] = prompts_option()
    scales: tuple[float, ...] = option((), "Steering: add S times each latent's decoder row (raw units, i.e. "
                                       "divided by the source's input_scale) at every position of each site. "
                                       "Repeat for a sweep; 0 = unsteered.", flags=("--scale",), metavar="S",
                                       multiple=True)
    clamps: tuple[float, ...] = option((), "Steering: hold each latent's activation at V: encode the site "
                                       "activations, then add (V - f_I) times its decoder row (raw units). Needs "
                                       "every read source in this model, read no later than the first written "
                                       "one. Repeat for a sweep.", flags=("--clamp",), metavar="V", multiple=True)
    sampling: Sampling = field(default_factory=Sampling)
    count: str | None = count_option()
    device: str = device_option("the models run")
    dtype: str = model_dtype_option()
    token_ids: bool = token_ids_option()

    def __post_init__(self):
        for name in ("latents", "scales", "clamps"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.latents:
            raise BadInput("give at least one --latent INDEX to steer")
        if bool(self.scales) == bool(self.clamps):
            raise BadInput("give either --scale or --clamp (one or more values), not both and not neither")
        if not all(math.isfinite(v) for v in self.scales + self.clamps):
            raise BadInput("--scale and --clamp values must be finite numbers")
        check_generation(self)

    @property
    def mode(self) -> str:
        return "scale" if self.scales else "clamp"
