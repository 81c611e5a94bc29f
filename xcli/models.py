"""Hugging Face models, offline: parse a model argument, pick a device and dtype, load the model.

A model argument is `[ALIAS=]ID_OR_PATH[@REVISION]`. It resolves to a local folder
(a path, or a snapshot in the local Hugging Face cache); nothing here uses the
network. Where activations live inside a loaded model is xcli.sites.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from xcli.errors import BadInput

ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = "auto, cpu, cuda or cuda:N"


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


# -- device and dtype ------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """`auto` (the first CUDA GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`; checked here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BadInput(f"--device {name!r} is not a device; use {DEVICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {name!r} is not supported; use {DEVICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadInput(f"--device {name!r} is not available: no CUDA device is on this machine; use cpu or auto")
        if (device.index or 0) >= count:
            raise BadInput(f"--device {name!r} is not available: this machine has {count} CUDA device(s)")
    return device


def check_dtype(name: str) -> None:
    if name not in ("auto", *DTYPES):
        raise BadInput(f"--dtype {name!r} is not valid; use one of auto, {', '.join(DTYPES)}")


def fast_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[name]


def saved_dtype(name: str, folder: Path) -> torch.dtype:
    """`auto` is the dtype the checkpoint was saved in (float32 when it names none we use)."""
    if name != "auto":
        return DTYPES[name]
    config = read_config(folder)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if dtype in DTYPES.values() else torch.float32


# -- offline resolution ----------------------------------------------------------------------------

def looks_like_path(model_id: str) -> bool:
    """Hub ids are NAME or ORG/NAME; anything else is meant as a path."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or os.sep != "/" and os.sep in model_id


def resolve_folder(spec: ModelSpec) -> tuple[Path, str | None]:
    """The local model folder and the commit it was resolved to (hub cache only); never the network."""
    path = Path(spec.id).expanduser()
    if path.is_dir():
        if spec.revision:
            raise BadInput(f"model {spec.id!r} is a local folder; '@{spec.revision}' applies only to hub ids")
        folder, revision = path.resolve(), None
    elif path.exists():
        raise BadInput(f"model path {spec.id!r} is not a folder; give the folder a model was saved in")
    elif looks_like_path(spec.id):
        raise BadInput(f"model path {spec.id!r} does not exist")
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(spec.id, revision=spec.revision, local_files_only=True))
        except Exception:  # LocalEntryNotFoundError, or an id that is not even a valid repo name
            at = f"@{spec.revision}" if spec.revision else ""
            raise BadInput(f"model {spec.id + at!r} was not found locally: it is not a folder and not in the "
                           f"local Hugging Face cache; xc uses no network: download it first or give a local "
                           f"path") from None
        revision = folder.name
    if not (folder / "config.json").exists():
        raise BadInput(f"model {spec.id!r} is not a Hugging Face model folder (no config.json in {str(folder)!r})")
    return folder, revision


def read_config(folder: Path):
    from transformers import AutoConfig

    quiet_transformers()
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BadInput(f"{str(folder)!r} is not a Hugging Face model folder xc can read ({e})") from e


def quiet_transformers() -> None:
    """Keep library progress bars and load reports off stderr; ours is the only one."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers
    from packaging.version import Version

    # transformers renamed torch_dtype to dtype in 4.56.
    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


# -- loading ---------------------------------------------------------------------------------------

def load_tokenizer(spec: ModelSpec, folder: Path | None = None):
    from transformers import AutoTokenizer

    folder = folder or resolve_folder(spec)[0]
    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise BadInput(f"model {spec.id!r} has no usable tokenizer in {str(folder)!r} ({type(e).__name__})") from e


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: nn.Module
    tokenizer: object
    folder: Path
    revision: str | None
    dtype: torch.dtype


def load_model(spec: ModelSpec, device: torch.device, dtype: str = "auto") -> LoadedModel:
    """The base model (no LM head: harvest never needs logits) and its tokenizer; dtype `auto` as saved."""
    from transformers import AutoModel

    folder, revision = resolve_folder(spec)
    torch_dtype = saved_dtype(dtype, folder)
    tokenizer = load_tokenizer(spec, folder)
    model = AutoModel.from_pretrained(folder, local_files_only=True, **_dtype_kwarg(torch_dtype))
    model.config.use_cache = False  # no KV cache: one forward per window
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(spec, model, tokenizer, folder, revision, torch_dtype)


def has_causal_lm_head(config) -> bool:
    """Judged by the saved architecture (BertForMaskedLM is not causal even though the
    bert model type has a causal variant), or by the model type when none is saved."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    if getattr(config, "is_encoder_decoder", False):
        return False
    architectures = getattr(config, "architectures", None)
    if not architectures:
        return config.model_type in CAUSAL
    classes = set()
    for value in CAUSAL.values():
        classes.update([value] if isinstance(value, str) else value)
    return any(a in classes for a in architectures)


def load_causal_lm(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """A causal LM (with its head, for logits) in eval mode; encoders are refused."""
    from transformers import AutoModelForCausalLM

    folder, _ = resolve_folder(spec)
    config = read_config(folder)
    if not has_causal_lm_head(config):
        kind = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        raise BadInput(f"model {spec.id!r} ({kind}) has no causal language-model head; "
                       f"amplify needs a decoder-only model such as GPT-2, Llama or Pythia")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **_dtype_kwarg(dtype))
    return model.to(device).eval()


# -- what the config says --------------------------------------------------------------------------

def text_config(model: nn.Module):
    """The language model's config (multimodal models nest it)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def n_layers(model: nn.Module) -> int:
    config = text_config(model)
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)


def context_limit(model: nn.Module) -> int | None:
    """Positions the model accepts, when its config says."""
    config = text_config(model)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
