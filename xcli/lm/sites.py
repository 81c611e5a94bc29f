"""Sites: where in a loaded model a source's activations are read (harvest) or edited (steering).

    resid_post  output of block L (HF hidden_states[L+1], except the last block,
                whose hidden_states entry has the final norm applied)
    resid_pre   input of block L (HF hidden_states[L])
    attn_out    what the attention sublayer of block L adds to the residual stream
    mlp_out     what the MLP sublayer of block L adds to the residual stream
    MODULE.PATH the output of any module; `{layer}` in the path is replaced by each layer

Module paths may be written with or without the model's base prefix (`transformer.`,
`model.`, ...), so one path works for the base model and its causal-LM wrapper.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from xcli.errors import BadInput
from xcli.lm.config import SITES
from xcli.lm.models import n_layers

ATTN_NAMES = ("attn", "self_attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the shortest-named ModuleList with one entry per layer."""
    n = n_layers(model)
    candidates = [(name.count("."), name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise BadInput(f"cannot find the {n} transformer blocks of {type(model).__name__}; "
                       f"give the site as a module path")
    return min(candidates, key=lambda c: c[:2])[2]


def find_module(model: nn.Module, path: str) -> nn.Module:
    """A submodule by dotted path, with or without the base-model prefix (transformer., model., ...)."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [path]
    if prefix and path.startswith(prefix + "."):
        candidates.append(path[len(prefix) + 1:])  # a CausalLM path on the base model
    elif prefix:
        candidates.append(f"{prefix}.{path}")  # a base-model path on the CausalLM
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
    attention = _child(block, ATTN_NAMES)
    if hasattr(block, "intermediate") and hasattr(block, "output"):
        # BERT style (post-norm): the dense projection before "add & LayerNorm".
        out = attention.output if site == "attn_out" and attention is not None else block.output
        return getattr(out, "dense", None)
    if site == "attn_out":
        return attention
    return _child(block, MLP_NAMES)


@dataclass(frozen=True)
class Site:
    """Where one source lives: a module, and whether its input (a pre-hook) or its output is meant."""

    name: str
    site: str
    layer: int | None
    module: nn.Module
    catch_input: bool = False


def resolve_site(model: nn.Module, site: str, layer: int | None = None, alias: str = "") -> Site:
    """The Site of one (site, layer); its name is `[ALIAS.]SITE.LAYER` or `[ALIAS.]MODULE.PATH`."""
    prefix = f"{alias}." if alias else ""
    if site in SITES:
        blocks = find_blocks(model)
        if layer is None or not 0 <= layer < len(blocks):
            raise BadInput(f"layer {layer} of site {site!r} is out of range; the model has layers "
                           f"0-{len(blocks) - 1}")
        block = blocks[layer]
        module = block if site in ("resid_post", "resid_pre") else sublayer(block, site)
        if module is None:
            raise BadInput(f"site {site!r} is not known for {type(block).__name__}; "
                           f"give a module path instead (see the model's module names)")
        return Site(f"{prefix}{site}.{layer}", site, layer, module, catch_input=site == "resid_pre")
    if "{layer}" in site:
        if layer is None:
            raise BadInput(f"site {site!r} needs a layer for its '{{layer}}'")
        path = site.replace("{layer}", str(layer))
        return Site(f"{prefix}{path}", site, layer, find_module(model, path))
    return Site(f"{prefix}{site}", site, None, find_module(model, site))


def resolve_sites(model: nn.Module, alias: str, sites: tuple[str, ...], layers: list[int]) -> list[Site]:
    """One Site per (site, layer), site-major; sites without a layer are resolved once."""
    return [resolve_site(model, site, layer, alias) for site in sites
            for layer in (layers if site in SITES or "{layer}" in site else [None])]


# -- hooks -----------------------------------------------------------------------------------------

def hook_input(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a block is called with (positionally or as `hidden_states=`)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def hook_output(output):
    """The hidden states among what a module returns (a tensor, a tuple, or a ModelOutput)."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    return output


def replace_input(args: tuple, kwargs: dict, new: Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": new}
    return (new, *args[1:]), kwargs


def replace_output(output, new: Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def hook_site(site: Site, fn: Callable[[Tensor], Tensor | None]):
    """Call `fn(activation)` at the site on every forward pass; a different tensor it returns replaces
    the activation. Returns the handle to remove."""
    if site.catch_input:
        def pre_hook(module, args, kwargs):
            hidden = hook_input(args, kwargs)
            new = fn(hidden)
            return None if new is None or new is hidden else replace_input(args, kwargs, new)
        return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(module, args, output):
        hidden = hook_output(output)
        new = fn(hidden)
        return None if new is None or new is hidden else replace_output(output, new)
    return site.module.register_forward_hook(post_hook)


class StopForward(Exception):
    """Raised by the last hook: the remaining blocks are not needed."""


class Catcher:
    """Forward hooks on one model that keep the activations of its sites for one forward pass.

    When every site has fired the forward pass is stopped, so layers after the
    last site are never computed.
    """

    def __init__(self, model: nn.Module, sites: list[Site]):
        self.model, self.sites, self.caught, self.active = model, sites, {}, False
        self.handles = [hook_site(site, lambda value, name=site.name: self._keep(name, value)) for site in sites]

    def _keep(self, name, value):
        if not self.active:  # the model is run by someone else
            return
        self.caught[name] = value
        if len(self.caught) == len(self.sites):
            raise StopForward

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
