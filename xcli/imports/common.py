"""What every import shares: reading foreign files without running their code, naming sources, checking shapes.

Foreign files are untrusted: `.pt` state dicts are read with `torch.load(weights_only=True)` (tensors and
plain containers only, never arbitrary objects), everything else with safetensors or json; every tensor a
format needs is checked for its shape and finiteness before it is used.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from xcli.crosscoder.model import Crosscoder
from xcli.errors import BadInput
from xcli.source import Source, validate_source_names

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20

# TransformerLens hook names (SAELens's hook_name) of the sites xc harvest names.
TL_SITES = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_attn_out": "attn_out",
            "hook_mlp_out": "mlp_out"}
TL_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass
class Imported:
    """A foreign dictionary as an xc crosscoder, and the record of what was mapped how."""

    model: Crosscoder
    record: dict = field(default_factory=dict)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors by name from a .safetensors file or a weights-only torch state dict."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
        except Exception as e:  # noqa: BLE001 -- any failure of an untrusted file is one line
            raise BadInput(f"{str(path)!r} is not a readable safetensors file ({e})") from None
    loaded = _torch_load(path)
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise BadInput(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict of named tensors")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, Tensor)}
    return tensors


def _torch_load(path: Path):
    """torch.load, weights only (tensors and plain containers: the unpickler refuses anything else),
    memory-mapped where the file allows it so that a large state dict is not read twice into memory."""
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (pre-zip) format cannot be mapped
                raise
            return load(False)
    except Exception as e:  # noqa: BLE001 -- any failure of an untrusted file is one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{str(path)!r} is not a weights-only torch state dict ({first[:200]})") from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The names and shapes of a .safetensors file's or state dict's tensors, without reading the values
    (safetensors' header; a memory-mapped torch load)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"{str(path)!r} is not a readable safetensors file ({e})") from None
    loaded = _torch_load(path)
    if not isinstance(loaded, dict):
        raise BadInput(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict of named tensors")
    return {k: tuple(v.shape) for k, v in loaded.items() if isinstance(k, str) and isinstance(v, Tensor)}


def read_json(path: Path) -> dict:
    """A small JSON object (a config file), or one BadInput naming the file."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise BadInput(f"{str(path)!r} is over {MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{str(path)!r} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise BadInput(f"{str(path)!r} holds a JSON {type(value).__name__}, not an object")
    return value


def tensor(tensors: dict[str, Tensor], name: str, shape: tuple, where: str) -> Tensor:
    """The named tensor as float32, checked: present, floating, of `shape` (None = any size there), finite."""
    if name not in tensors:
        raise BadInput(f"{where}: tensor {name} is missing")
    t = tensors[name]
    if not t.is_floating_point():
        raise BadInput(f"{where}: tensor {name} has dtype {t.dtype}, expected a floating dtype")
    if len(t.shape) != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        shown = tuple("*" if s is None else s for s in shape)
        raise BadInput(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {shown}")
    t = t.detach().float()
    if not torch.isfinite(t).all():
        raise BadInput(f"{where}: tensor {name} holds non-finite values (NaN or inf)")
    return t


def site_of_hook(hook: str) -> tuple[str, int | None]:
    """(xc site, layer) of a TransformerLens hook name: blocks.6.hook_resid_post -> (resid_post, 6).
    Other hooks keep their name with the layer as a template: blocks.6.ln2.hook_normalized ->
    (blocks.{layer}.ln2.hook_normalized, 6), which `xcli.export.circuit_tracer` maps back."""
    m = TL_HOOK.match(hook)
    if not m:
        return hook, None
    layer, rest = int(m.group(1)), m.group(2)
    return TL_SITES.get(rest, f"blocks.{{layer}}.{rest}"), layer


def model_slug(model: str) -> str:
    """The last part of a model id, as a plain source-name part: google/gemma-2-2b -> gemma-2-2b."""
    last = model.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", last) or "model"


def make_source(spec: tuple, d: int, where: str) -> Source:
    """A Source from a parsed --source spec (name, model, site, layer) and the width the weights give."""
    name, model, site, layer = spec
    if name is None:
        short = site.replace("blocks.{layer}.", "").replace("{layer}.", "").replace(".{layer}", "")
        name = ".".join(str(p) for p in (model_slug(model), short, layer) if p is not None)
    source = {"name": name, "model": model, "site": site, "layer": layer, "d": d, "revision": None}
    return Source.from_json(source, where)


def sources_for(specs, widths: list[int], what: str, example: str) -> list[Source]:
    """One source per foreign layer, from --source (in the dictionary's order), checked and uniquely named."""
    if len(specs) != len(widths):
        given = f"{len(specs)} --source" if specs else "no --source"
        raise BadInput(f"the dictionary has {len(widths)} {what}; {given} given: give --source "
                       f"[NAME=]MODEL:SITE[:LAYER] once per {what.rstrip('s')}, in its order (e.g. {example})")
    sources = [make_source(spec, d, "--source") for spec, d in zip(specs, widths)]
    validate_source_names(sources)
    return sources

