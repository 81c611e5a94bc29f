"""Hugging Face models, offline: parse a model argument, pick a device and dtype, load the model.

A model argument is `[ALIAS=]ID_OR_PATH[@REVISION]`. It resolves to a local folder
(a path, or a snapshot in the local Hugging Face cache); nothing here uses the
network. Where activations live inside a loaded model is xcli.lm.sites.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from xcli.errors import BadInput
from xcli.lm.config import ModelSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- device and dtype ------------------------------------------------------------------------------

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
    """The tokenizer of a model; a local folder may hold a tokenizer alone (no model config)."""
    from transformers import AutoTokenizer

    if folder is None:
        path = Path(spec.id).expanduser()
        folder = path if path.is_dir() and not spec.revision else resolve_folder(spec)[0]
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


def load_lm_or_encoder(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, bool]:
    """A causal LM with its head, or any other model without one (an encoder such as BERT, whose
    activations can still be read and edited), in eval mode; and whether it has a causal LM head."""
    from transformers import AutoModel

    folder, _ = resolve_folder(spec)
    if has_causal_lm_head(read_config(folder)):
        return load_causal_lm(spec, device, dtype), True
    model = AutoModel.from_pretrained(folder, local_files_only=True, **_dtype_kwarg(dtype))
    return model.to(device).eval(), False


def check_same_tokenizer(tok_a, tok_b, name_a: str, name_b: str) -> None:
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if vocab_a != vocab_b:
        only_a = sorted(set(vocab_a) - set(vocab_b))[:3]
        detail = f"{len(vocab_a)} vs {len(vocab_b)} tokens" if len(vocab_a) != len(vocab_b) else \
            f"e.g. {only_a[0]!r}" if only_a else "same tokens, different ids"
        raise BadInput(f"{name_a} and {name_b} use different tokenizers ({detail}); "
                       f"logits can only be compared over one shared vocabulary")


def sources_of_model(crosscoder, spec: ModelSpec, given: str) -> list:
    """The checkpoint's sources that belong to `spec`.

    Rule: with ALIAS=PATH a source belongs when its "model" field equals ALIAS; without an alias when it
    equals the path or id as written, or names the same existing folder.
    """
    def belongs(source) -> bool:
        if spec.alias_given:
            return source.model == spec.alias
        if source.model == spec.id:
            return True
        a, b = Path(source.model), Path(spec.id)
        return a.exists() and b.exists() and a.resolve() == b.resolve()

    mine = [s for s in crosscoder.sources if belongs(s)]
    if not mine:
        models = sorted({s.model for s in crosscoder.sources})
        raise BadInput(f"--model {given!r} matches none of the checkpoint's sources, which belong to model(s) "
                       f"{', '.join(map(repr, models))}; pass --model ALIAS=PATH with one of these aliases")
    return mine


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


# -- reading a model's files without loading it (xc export) -----------------------------------

# Tensor names that hold a model's unembedding (lm_head) or, when tied, its input embedding.
UNEMBEDDING_KEYS = ("lm_head.weight", "embed_out.weight")
EMBEDDING_KEYS = ("wte.weight", "embed_tokens.weight", "word_embeddings.weight", "embed_in.weight")


def config_json(folder: Path) -> dict:
    """config.json as saved (the text model's part of a multimodal config), read without transformers."""
    path = folder / "config.json"
    if not path.exists():
        raise BadInput(f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
    config = json.loads(path.read_text())
    return config.get("text_config", config) if "text_config" in config else config


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: path for name in f.keys()})
    return out


def read_unembedding(folder: Path) -> torch.Tensor:
    """The model's unembedding W_U as (vocab, d_model) float32, read from its files without loading the model."""
    config = config_json(folder)
    tied = config.get("tie_word_embeddings", True)
    names = weight_files(folder)
    for suffixes in (UNEMBEDDING_KEYS, EMBEDDING_KEYS if tied else ()):
        found = sorted(n for n in names if any(n == s or n.endswith("." + s) for s in suffixes))
        if found:
            with safe_open(str(names[found[0]]), framework="pt") as f:
                return f.get_tensor(found[0]).float()
    try:  # weights in another layout (e.g. pytorch_model.bin): let transformers find the output embedding
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        return model.get_output_embeddings().weight.detach().float()
    except Exception as e:
        raise BadInput(f"cannot read the unembedding of the model in {str(folder)!r} ({type(e).__name__}); "
                       f"the logit lens needs lm_head weights") from None


# Model types whose blocks end in a LayerNorm ("add & norm" after each sublayer, as in the original Transformer
# and BERT), so that a block's output, the residual stream between blocks, is normalised. GPT-2, GPT-NeoX, Llama,
# Gemma, Qwen, Mistral ... norm a sublayer's input instead (pre-LN). roberta-prelayernorm, megatron-bert and
# xlm-roberta-xl are pre-LN despite their names.
POST_NORM_MODEL_TYPES = frozenset({
    "albert", "bert", "bert-generation", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2",
    "distilbert", "electra", "ernie", "layoutlm", "luke", "mpnet", "nezha", "openai-gpt", "rembert", "roberta",
    "squeezebert", "xlm", "xlm-roberta",
})


def post_norm(folder: Path) -> bool:
    """Whether the model's blocks end in a LayerNorm (post-LN, BERT-style), as its config.json says."""
    config = config_json(folder)
    model_type = config.get("model_type", "")
    if model_type == "opt":  # OPT-350m norms after its sublayers
        return config.get("do_layer_norm_before", True) is False
    if model_type == "flaubert":
        return not config.get("pre_norm", False)
    return model_type in POST_NORM_MODEL_TYPES


def model_facts(folder: Path) -> dict:
    """Width, layers and MLP neurons, as config.json states them."""
    config = config_json(folder)
    d = config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers") or 0
    neurons = config.get("intermediate_size") or config.get("n_inner") or (4 * d if "n_embd" in config else 0)
    return {"dimension": int(d), "layers": int(layers), "neurons": int(neurons)}
