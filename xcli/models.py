"""Hugging Face models, offline: parse a model argument, load it, and catch activations.

A model argument is `[ALIAS=]ID_OR_PATH[@REVISION]`. It resolves to a local folder
(a path, or a snapshot in the local Hugging Face cache); nothing here uses the
network. Activations are caught with forward hooks at *sites*:

    resid_post  output of block L (HF hidden_states[L+1], except the last block,
                whose hidden_states entry has the final norm applied)
    resid_pre   input of block L (HF hidden_states[L])
    attn_out    what the attention sublayer of block L adds to the residual stream
    mlp_out     what the MLP sublayer of block L adds to the residual stream
    MODULE.PATH the output of any module; `{layer}` in the path is replaced by each layer
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xcli.errors import BadInput

SITES = ("resid_post", "resid_pre", "attn_out", "mlp_out")
ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """One `--model` argument: a short alias, a local path or hub id, and an optional revision."""

    alias: str
    id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        alias, rest = None, text
        head, sep, tail = text.partition("=")
        if sep and ALIAS.match(head):
            alias, rest = head, tail
        revision = None
        if "@" in rest and not Path(rest).exists():
            rest, revision = rest.rsplit("@", 1)
            if not revision:
                raise BadInput(f"model {text!r} has an empty revision after '@'")
        if not rest:
            raise BadInput(f"model {text!r} names no model; use [ALIAS=]ID_OR_PATH[@REVISION]")
        if alias is None:  # a readable default: the last path component, made safe
            alias = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(rest.rstrip("/")).name).strip("-") or "model"
        return cls(alias=alias, id=rest, revision=revision)

    def __str__(self) -> str:
        return f"{self.alias}={self.id}" + (f"@{self.revision}" if self.revision else "")


def looks_like_path(model_id: str) -> bool:
    """Hub ids are NAME or ORG/NAME; anything else is meant as a path."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or os.sep != "/" and os.sep in model_id


def resolve_folder(spec: ModelSpec) -> tuple[Path, str | None]:
    """The local folder holding the model, and the commit it was resolved to (hub cache only)."""
    path = Path(spec.id).expanduser()
    if path.is_dir():
        if spec.revision:
            raise BadInput(f"model {spec.id!r} is a local folder; '@{spec.revision}' applies only to hub ids")
        return path.resolve(), None
    if path.exists():
        raise BadInput(f"model path {spec.id!r} is not a folder; give the folder a model was saved in")
    if looks_like_path(spec.id):
        raise BadInput(f"model path {spec.id!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec.id, revision=spec.revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, or an id that is not even a valid repo name
        at = f"@{spec.revision}" if spec.revision else ""
        raise BadInput(f"model {spec.id + at!r} was not found locally (not a folder, not in the Hugging Face "
                       f"cache); xc uses no network: download it first or give a local path") from None
    return folder, folder.name


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: nn.Module
    tokenizer: object
    folder: Path
    revision: str | None
    dtype: torch.dtype


def checkpoint_dtype(folder: Path) -> torch.dtype:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if dtype in DTYPES.values() else torch.float32


def quiet_transformers() -> None:
    """Keep library progress bars and load reports off stderr; ours is the only one."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def load_model(spec: ModelSpec, device: torch.device, dtype: str = "auto") -> LoadedModel:
    """Load the base model (no LM head: harvest never needs logits) and its tokenizer, offline."""
    from transformers import AutoModel, AutoTokenizer

    folder, revision = resolve_folder(spec)
    if not (folder / "config.json").exists():
        raise BadInput(f"model {spec.id!r} is not a Hugging Face model folder (no config.json in {str(folder)!r})")
    quiet_transformers()
    torch_dtype = checkpoint_dtype(folder) if dtype == "auto" else DTYPES[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise BadInput(f"model {spec.id!r} has no usable tokenizer in {str(folder)!r} ({type(e).__name__})") from e
    model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch_dtype)
    model.config.use_cache = False  # no KV cache: one forward per window
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(spec, model, tokenizer, folder, revision, torch_dtype)


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the first ModuleList as long as the layer count."""
    n = text_config(model).num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise BadInput(f"cannot find the {n} transformer blocks of {type(model).__name__}; "
                   f"give the site as a module path")


def n_layers(model: nn.Module) -> int:
    return text_config(model).num_hidden_layers


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


def find_module(model: nn.Module, path: str) -> nn.Module:
    """A submodule by dotted path; the CausalLM prefix (transformer., model., ...) is optional."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [path]
    if prefix and path.startswith(prefix + "."):
        candidates.append(path[len(prefix) + 1:])
    for candidate in candidates:
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    example = next((n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)), "")
    raise BadInput(f"site {path!r} is not a named site ({', '.join(SITES)}) nor a module of "
                   f"{type(model).__name__} (module paths look like {example!r})")


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def sublayer(block: nn.Module, site: str) -> nn.Module | None:
    """The module whose output is what a sublayer adds to the residual stream."""
    if hasattr(block, "post_feedforward_layernorm"):
        # Gemma-2/3 style: each sublayer's output is normed before it is added.
        return block.post_attention_layernorm if site == "attn_out" else block.post_feedforward_layernorm
    attention = _child(block, ("attn", "self_attn", "attention", "self_attention"))
    if hasattr(block, "intermediate") and hasattr(block, "output"):
        # BERT style (post-norm): the dense projection before "add & LayerNorm".
        out = attention.output if site == "attn_out" and attention is not None else block.output
        return getattr(out, "dense", None)
    if site == "attn_out":
        return attention
    return _child(block, ("mlp", "feed_forward", "ffn", "block_sparse_moe"))


@dataclass(frozen=True)
class Site:
    """Where one source is caught: a module and whether we want its input or its output."""

    name: str
    site: str
    layer: int | None
    module: nn.Module
    catch_input: bool = False


def resolve_sites(model: nn.Module, alias: str, sites: tuple[str, ...], layers: list[int]) -> list[Site]:
    """One Site per (site, layer): named sites use the blocks; module paths are looked up."""
    out = []
    for site in sites:
        if site in SITES:
            block_list = blocks(model)
            for layer in layers:
                block = block_list[layer]
                if site in ("resid_post", "resid_pre"):
                    module = block
                else:
                    module = sublayer(block, site)
                    if module is None:
                        raise BadInput(f"site {site!r} is not known for {type(block).__name__}; "
                                       f"give a module path instead (see the model's module names)")
                out.append(Site(f"{alias}.{site}.{layer}", site, layer, module, catch_input=site == "resid_pre"))
        elif "{layer}" in site:
            for layer in layers:
                path = site.replace("{layer}", str(layer))
                out.append(Site(f"{alias}.{path}", site, layer, find_module(model, path)))
        else:
            out.append(Site(f"{alias}.{site}", site, None, find_module(model, site)))
    return out


class StopForward(Exception):
    """Raised by the last hook: the remaining blocks are not needed."""


def _first_tensor(value):
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return value


class Catcher:
    """Forward hooks on one model that keep the activations of its sites for one forward pass.

    When every site has fired the forward pass is stopped, so layers after the
    last site are never computed.
    """

    def __init__(self, model: nn.Module, sites: list[Site]):
        self.model, self.sites, self.caught, self.active = model, sites, {}, False
        self.handles = []
        for site in sites:
            if site.catch_input:
                hook = self.model_input_hook(site.name)
                self.handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self.handles.append(site.module.register_forward_hook(self.output_hook(site.name)))

    def _keep(self, name, value):
        if not self.active:  # the model is run by someone else
            return
        self.caught[name] = _first_tensor(value)
        if len(self.caught) == len(self.sites):
            raise StopForward

    def output_hook(self, name):
        return lambda module, args, output: self._keep(name, output)

    def model_input_hook(self, name):
        def hook(module, args, kwargs):
            self._keep(name, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        return hook

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations (batch, tokens, d) of every site, by source name."""
        self.caught, self.active = {}, True
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        except StopForward:
            pass
        finally:
            self.active = False
        missing = [s.name for s in self.sites if s.name not in self.caught]
        if missing:
            raise BadInput(f"site(s) {', '.join(missing)} never ran during the forward pass; choose modules "
                           f"that the model calls")
        for name, value in self.caught.items():
            if not (isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[:2] == input_ids.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise BadInput(f"site {name!r} gives {shape}, not (batch, tokens, width) activations; "
                               f"choose another module")
        caught, self.caught = self.caught, {}
        return caught

    def close(self):
        for handle in self.handles:
            handle.remove()
