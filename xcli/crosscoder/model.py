"""The crosscoder: per-source encoders into one shared latent space, per-source decoders out.

    f      = act( sum_{s in read}  (x_s * scale_s) @ W_enc^s  + b_enc )        (B, F)
    x̂_s   = ( f @ W_dec^s + b_dec^s ) / scale_s          for s in write       (B, d_s)

`scale_s` makes each source's mean squared norm equal to d_s during training; it is
applied inside encode/decode, so callers pass and receive raw activations.
Decoder norms (used for classification) are in normalised units.

act is ReLU (with an L1 penalty weighted by the sum of per-source decoder norms),
TopK per token, or BatchTopK (top k*B over the batch in training; a learned global
threshold at inference, so that encoding one token never depends on its batch), or
JumpReLU (f_i = h_i where h_i > θ_i, a learned threshold per latent; xcli.crosscoder.jumprelu).
A Matryoshka crosscoder (xcli/crosscoder/matryoshka.py) is a batchtopk one whose training
loss also makes nested prefixes of the dictionary reconstruct the input (`Crosscoder.matryoshka`).
Latents are ranked by f_i * sum_s ||W_dec,i^s||; the kept values are the unscaled f_i.

The checkpoint (man/xc-checkpoint.5) is one safetensors file: tensors
`encoder.<source>` (d_s, F), `decoder.<source>` (F, d_s), `encoder_bias` (F,),
`decoder_bias.<source>` (d_s,), `input_scale.<source>` (), `threshold` () for
batchtopk or (F,) for jumprelu, and metadata key "xc" holding a JSON description.
"""

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from xcli import console, strict_json
from xcli.crosscoder import jumprelu, sparse
from xcli.crosscoder.config import ARCHS, THRESHOLD_ARCHS
from xcli.crosscoder.matryoshka import Prefixes, decode_groups
from xcli.crosscoder.partition import Partition
from xcli.distributed import SINGLE, Comm
from xcli.errors import BadInput
from xcli.files import atomic_path
from xcli.source import Source
from xcli.version import __version__

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "crosscoder", 1


class ForwardOutput(NamedTuple):
    latents: Tensor
    """Latent activations f, shape (B, F), zero where not selected."""
    reconstruction: dict[str, Tensor]
    """Reconstruction of each written source in normalised units, shape (B, d_s)."""
    pre_activations: Tensor
    """Encoder output before the activation function, shape (B, F)."""


class SparseOutput(NamedTuple):
    pairs: sparse.Pairs
    """The selected (token, latent) pairs."""
    values: Tensor
    """f at the pairs, (N,); differentiable in the encoder."""
    reconstruction: dict[str, Tensor]
    """Reconstruction of each written source in normalised units, shape (B, d_s)."""
    encoder_out: Tensor
    """Σ_s x_s @ W_enc^s without the bias, (B, F), in the compute dtype, without grad."""
    inputs: list[Tensor]
    """What the encoder multiplied: the read sources in normalised units (Crosscoder.sparse_weights)."""
    compute_dtype: torch.dtype
    min_score: Tensor | None
    """BatchTopK in training: the smallest kept selection score (what the threshold tracks)."""
    encoder: list[Tensor]
    """The encoder weights used, per read source (d_s, F) (fmx: its latent factor, see sparse_weights)."""
    decoder: list[Tensor]
    """The decoder weights used, per written source (F, d_s)."""
    prefixes: list[list[Tensor]] | None = None
    """Matryoshka: per nested prefix, per written source, its reconstruction without bias (B, d_s)."""


class Crosscoder(nn.Module):
    sparse_path = True
    """Train TopK/BatchTopK on the sparse path (xcli.crosscoder.sparse); False: the dense reference."""
    factorized = False
    """True in subclasses that compute W_enc / W_dec from factors (xcli/fmx.py) instead of holding them."""
    source_comm: Comm = SINGLE
    """Model parallel (xcli.crosscoder.source_parallel): the ranks that hold the other sources; this model holds some of them."""
    partition: Partition | None = None
    """Tied and dedicated latent blocks (xcli.crosscoder.partition), or None for a plain crosscoder."""
    matryoshka: Prefixes | None = None
    """Matryoshka crosscoders (xcli.crosscoder.matryoshka): the nested prefixes the training loss uses."""

    def __init__(self, sources: list[Source], n_latents: int, arch: str = "batchtopk", k: int | None = None,
                 read: list[str] | None = None, write: list[str] | None = None):
        super().__init__()
        names = [s.name for s in sources]
        read, write = list(read or names), list(write or names)
        if arch not in ARCHS:
            raise BadInput(f"--arch {arch!r} is not known; use one of {', '.join(ARCHS)}")
        for label, chosen in (("--read", read), ("--write", write)):
            unknown = [n for n in chosen if n not in names]
            if unknown:
                raise BadInput(f"{label} names unknown source {unknown[0]!r}; sources are: {', '.join(names)}")
            if not chosen:
                raise BadInput(f"{label} names no source; sources are: {', '.join(names)}")
        if arch in ("topk", "batchtopk") and not (k and 0 < k < n_latents):
            raise BadInput(f"--k {k} must be between 1 and the number of latents - 1 ({n_latents - 1})")
        self.sources, self.n_latents, self.arch, self.k = list(sources), n_latents, arch, k
        self.read, self.write = read, write
        d = {s.name: s.d for s in sources}
        # ParameterLists, not dicts: source names contain dots, which module keys cannot.
        if not self.factorized:
            self.W_enc = nn.ParameterList([nn.Parameter(torch.zeros(d[n], n_latents)) for n in read])
            self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(n_latents, d[n])) for n in write])
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.ParameterList([nn.Parameter(torch.zeros(d[n])) for n in write])
        self.register_buffer("input_scale", torch.ones(len(sources)))
        self.register_buffer("threshold", torch.zeros(()))
        if arch == "jumprelu":  # θ_i = exp(log_threshold_i), trained (xcli.crosscoder.jumprelu)
            self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(jumprelu.DEFAULT_INITIAL_THRESHOLD)))
            # training settings (xc train sets them from its options; not part of the checkpoint's tensors)
            self.bandwidth = jumprelu.DEFAULT_BANDWIDTH
            self.tanh_scale = jumprelu.DEFAULT_TANH_SCALE
            self.preact_penalty = jumprelu.DEFAULT_PREACT_PENALTY

    # -- parameters by source name ------------------------------------------------
    def scale(self, name: str) -> Tensor:
        return self.input_scale[[s.name for s in self.sources].index(name)]

    def encoder_weight(self, name: str) -> Tensor:
        return self.W_enc[self.read.index(name)]

    def decoder_weight(self, name: str) -> Tensor:
        return self.W_dec[self.write.index(name)]

    def decoder_bias(self, name: str) -> Tensor:
        return self.b_dec[self.write.index(name)]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, decoder_norm: float | None = None) -> None:
        """Decoder rows: random directions of norm `decoder_norm` per source; encoder = decoder^T.

        The default, 1/sqrt(written sources), gives each latent a decoder of unit norm over all
        its sources, as in Gao et al. (2024) and Conerly et al. (2024). The earlier 0.1 per source
        left 87% of latents dead and recovered 9% of a planted set where this recovers 61-65%
        (benchmarks/README.md#qualitypy, issue 16)."""
        if decoder_norm is None:
            decoder_norm = len(self.write) ** -0.5
        for name in self.write:
            w = torch.randn(self.decoder_weight(name).shape, generator=generator)
            self.decoder_weight(name).copy_(w / w.norm(dim=1, keepdim=True) * decoder_norm)
        for name in self.read:
            if name in self.write:
                self.encoder_weight(name).copy_(self.decoder_weight(name).T)
            else:  # a read-only source (e.g. a transcoder's input): random, same scale
                w = torch.randn(self.encoder_weight(name).shape, generator=generator)
                self.encoder_weight(name).copy_(w / w.norm(dim=0, keepdim=True) * decoder_norm)
        self.b_enc.zero_()
        for b in self.b_dec:
            b.zero_()

    @torch.no_grad()
    def init_decoder_bias(self, means: dict[str, Tensor]) -> None:
        """Start each decoder bias at its source's mean (raw units in, normalised units stored)."""
        for name in self.write:
            self.decoder_bias(name).copy_(torch.as_tensor(means[name]) * self.scale(name))

    # -- the model ------------------------------------------------------------------
    def decoder_norms(self) -> Tensor:
        """Per-latent decoder norm in each written source, shape (F, n_write), normalised units."""
        return torch.stack([w.norm(dim=1) for w in self.W_dec], dim=1)

    def thresholds(self) -> Tensor:
        """JumpReLU: the per-latent thresholds θ (F,) on the pre-activations, differentiable."""
        return self.log_threshold.exp()

    @torch.no_grad()
    def set_thresholds(self, theta: Tensor) -> None:
        """JumpReLU: set θ (F,), values >= 0 (0 gives log θ = -inf: the latent is a plain ReLU)."""
        self.log_threshold.copy_(torch.as_tensor(theta, dtype=torch.float32).log())

    def scores(self, f: Tensor) -> Tensor:
        """The selection score f_i * sum_s ||W_dec,i^s|| that TopK, BatchTopK and the threshold use."""
        return f * self.decoder_norms().sum(dim=1)

    def pre_activations(self, x: dict[str, Tensor]) -> Tensor:
        out = self.b_enc
        for name, w in zip(self.read, self.W_enc):
            out = out + (x[name].to(w.dtype) * self.scale(name)) @ w
        return out

    def activate(self, pre: Tensor, batch_select: bool | None = None) -> Tensor:
        """The activation function. batch_select: BatchTopK over the batch (default: in training)."""
        if self.arch == "jumprelu":
            return jumprelu.jumprelu(pre, self.thresholds(), self.bandwidth)
        f = torch.relu(pre)
        if self.arch == "relu":
            return f
        score = self.scores(f)
        if self.arch == "topk":
            idx = score.topk(self.k, dim=-1).indices
            return torch.zeros_like(f).scatter(-1, idx, f.gather(-1, idx))
        if batch_select if batch_select is not None else self.training:
            flat = score.flatten()
            idx = flat.topk(min(self.k * score.shape[0], flat.numel())).indices
            keep = torch.zeros_like(flat, dtype=torch.bool).scatter(0, idx, True).view_as(f)
            return f * (keep & (score > 0))
        return f * (score > self.threshold)

    def encode(self, x: dict[str, Tensor], batch_select: bool | None = None) -> Tensor:
        """Raw activations of the read sources -> latents f (B, F)."""
        return self.activate(self.pre_activations(x), batch_select)

    def decode_normalised(self, f: Tensor, bias: bool = True) -> dict[str, Tensor]:
        return {name: f.to(w.dtype) @ w + b if bias else f.to(w.dtype) @ w
                for name, w, b in zip(self.write, self.W_dec, self.b_dec)}

    def decode(self, f: Tensor) -> dict[str, Tensor]:
        """Latents f -> reconstructions of the written sources in raw units."""
        return {name: y / self.scale(name) for name, y in self.decode_normalised(f).items()}

    def forward(self, x: dict[str, Tensor], batch_select: bool | None = None) -> ForwardOutput:
        pre = self.pre_activations(x)
        f = self.activate(pre, batch_select)
        return ForwardOutput(f, self.decode_normalised(f), pre)

    def forward_sparse(self, x: dict[str, Tensor], batch_select: bool | None = None, batch_rows: int | None = None,
                       comm: Comm = SINGLE) -> SparseOutput:
        """`forward` for topk and batchtopk without any dense (B, F) latent matrix after the selection:
        the decoder gathers the selected rows, and the backward touches only the selected latents.

        Under autocast (bf16) the encoder matmul runs in bf16; the rest stays in float32.
        Data-parallel: x is this rank's share of a batch of `batch_rows` rows, and BatchTopK
        selects over the whole batch through `comm`. Split over sources (`self.source_comm`): x holds
        this rank's sources of the whole batch, and every rank makes the same selection."""
        if self.arch in ("relu", *THRESHOLD_ARCHS):
            raise ValueError(f"forward_sparse is for topk and batchtopk; {self.arch} latents are computed densely")
        device = self.b_enc.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
        xs, enc, dec = self.sparse_weights(x)
        min_score = None
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            mm = sparse.encoder_matmul(xs, enc, dtype)  # (B, F)
            norms = torch.stack([w.norm(dim=1) for w in dec], dim=1).sum(dim=1)
            if self.source_comm.world > 1:  # sums over this rank's sources -> over all sources
                mm, norms = self.source_comm.sum_(mm), self.source_comm.sum_(norms)
            # pre * norms in one pass over (B, F), in the matmul's dtype; <= 0 where ReLU gives 0
            score = torch.addcmul((self.b_enc * norms).to(mm.dtype), mm, norms.to(mm.dtype))
            if self.arch == "topk":
                pairs = sparse.select_topk(score, self.k)
            elif batch_select if batch_select is not None else self.training:
                pairs, min_score = sparse.select_batchtopk(score, self.k, batch_rows=batch_rows, comm=comm)
            else:
                pairs = sparse.select_above(score, self.threshold)
            del score
            pre_at = pairs.gather(mm).float() + self.b_enc[pairs.cols]
        values = sparse.encoder_values(pairs, pre_at, xs, self.b_enc, enc, dtype)
        values = self.source_comm.sum_gradient(values)  # dv_n = Σ over all sources' decoders
        prefixes = None
        if self.matryoshka is not None:  # each group decoded once; the whole dictionary is the last prefix
            prefixes = decode_groups(pairs, values, dec, self.matryoshka)
            decoded = prefixes[-1]
        else:
            decoded = self.sparse_decode(pairs, values, dec)
        recon = {name: y + b for name, y, b in zip(self.write, decoded, self.b_dec)}
        return SparseOutput(pairs, values, recon, mm, xs, dtype, min_score, enc, dec, prefixes)

    def sparse_weights(self, x: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """What one sparse-path step multiplies: (inputs, encoder, decoder), where Σ_s inputs[s] @ encoder[s]
        is the encoder output without bias and decoder holds each written source's (F, d_s) weights.
        Here the scaled read sources and the weights; fmxcoders contract their factors instead."""
        enc, dec = list(self.W_enc), list(self.W_dec)
        return [x[name].to(w.dtype) * self.scale(name) for name, w in zip(self.read, enc)], enc, dec

    def sparse_decode(self, pairs: sparse.Pairs, values: Tensor, decoder: list[Tensor]) -> list[Tensor]:
        """The sparse path's reconstructions without bias, one (B, d_s) per written source."""
        return sparse.decode(pairs, values, decoder)

    def sparse_aux_reconstruction(self, out: SparseOutput, dead: Tensor, k_aux: int) -> dict[str, Tensor]:
        """AuxK on the sparse path: the decoded (no bias) top k_aux ReLU pre-activations among dead latents."""
        dead_latents = dead.nonzero().squeeze(1)
        k_aux = min(k_aux, dead_latents.numel())
        with torch.no_grad():
            pre_dead = out.encoder_out[:, dead_latents].float() + self.b_enc[dead_latents]
            pairs = sparse.Pairs.per_row(dead_latents[pre_dead.topk(k_aux, dim=1, sorted=False).indices],
                                         self.n_latents)
            pre_at = pairs.gather(out.encoder_out).float() + self.b_enc[pairs.cols]
        values = sparse.encoder_values(pairs, pre_at, out.inputs, self.b_enc, out.encoder, out.compute_dtype)
        values = self.source_comm.sum_gradient(values)
        return dict(zip(self.write, self.sparse_decode(pairs, values, out.decoder)))

    def normalise(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: v * self.scale(name) for name, v in x.items()}

    # -- training helpers ------------------------------------------------------------
    def aux_latents(self, pre: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        """AuxK: per token, the k_aux largest ReLU pre-activations among dead latents, (B, F).

        Decoding these (without bias) should explain the residual the live latents leave,
        which gives dead latents a gradient (Gao et al. 2024).
        """
        k_aux = min(k_aux, int(dead.sum()))
        if k_aux == 0:
            return torch.zeros_like(pre)
        masked = torch.where(dead, torch.relu(pre), torch.zeros_like(pre))
        top = masked.topk(k_aux, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    @torch.no_grad()
    def batch_threshold(self, f: Tensor) -> Tensor:
        """The smallest positive selection score kept in a training batch (BatchTopK), a scalar."""
        score = self.scores(f.float())
        positive = score[score > 0]
        return positive.min() if positive.numel() else torch.zeros((), device=f.device)

    @torch.no_grad()
    def update_threshold(self, batch_min: Tensor, decay: float) -> None:
        """Move the inference threshold toward one batch's minimum: an exponential moving average."""
        self.threshold.mul_(decay).add_((1 - decay) * batch_min.to(self.threshold.dtype))

    @torch.no_grad()
    def calibrate_threshold(self, batches, candidates: int = 4) -> float:
        """Set the BatchTopK inference threshold so that k latents per token fire on average over
        `batches` (dicts of raw activations): midway between the k·N-th and (k·N+1)-th largest
        selection scores of their N rows, so that rounding (another batch size, a split over
        sources) does not decide whether the boundary score fires on these rows.
        Split over sources, every rank calls it on its sources' columns of the same rows.

        The running average of batch minima that training keeps lags the weights (it averages
        scores of earlier, different weights), which left inference L0 20-25% below k (issue 16).
        Each batch keeps its `candidates`·k·B best scores, which hold the k·N best of all rows
        unless one batch holds `candidates` times its share of them. Returns the threshold."""
        kept, rows = [], 0
        for x in batches:
            enc, dec = list(self.W_enc), list(self.W_dec)
            mm = sparse.encoder_matmul([x[n].float() * self.scale(n) for n in self.read], enc, torch.float32)
            norms = torch.stack([w.norm(dim=1) for w in dec], dim=1).sum(dim=1)
            if self.source_comm.world > 1:  # split over sources: every rank sums the others' parts in
                mm, norms = self.source_comm.sum_(mm), self.source_comm.sum_(norms)
            score = torch.relu(mm + self.b_enc) * norms
            kept.append(score.flatten().topk(min(score.numel(), candidates * self.k * len(score))).values)
            rows += len(score)
        if not rows:
            return float(self.threshold)
        values = torch.cat(kept)
        want = self.k * rows
        t = values.topk(want + 1).values[-2:].mean() if values.numel() > want else values.new_zeros(())
        self.threshold.copy_(t.clamp_min(0))
        return float(self.threshold)

    def extra_tensors(self) -> dict[str, Tensor]:
        """Tensors a subclass saves beside the ones every reader knows (xcli/fmx.py: its factors)."""
        return {}

    # -- description -----------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "xc_version": __version__,
            "arch": self.arch, "n_latents": self.n_latents, "k": self.k,
            "sources": [s.to_json() for s in self.sources], "read": self.read, "write": self.write,
            "conventions": {
                "reconstruction_loss": "sum over written sources of squared L2 error, normalised units",
                "sparsity_penalty": "l1 * sum_i f_i * sum_s ||W_dec,i^s|| (relu only)",
                "selection_score": "f_i * sum_s ||W_dec,i^s||",
                "decoder_norm_units": "normalised (input scaled so mean squared norm = d_s)",
            },
        } | ({"partition": self.partition.to_json()} if self.partition else {}) | (
            {"jumprelu": {"activation": "f_i = h_i if h_i > threshold_i else 0, h the pre-activation in normalised "
                                        "units; tensor threshold (F,)",
                          "sparsity_penalty": "lambda_s(t) * sum_i tanh(c * f_i * sum_s ||W_dec,i^s||) + lambda_p * "
                                              "sum_i relu(threshold_i - h_i) * sum_s ||W_dec,i^s||"}}
            if self.arch == "jumprelu" else {}) | ({"matryoshka": self.matryoshka.to_json()} if self.matryoshka else {})

def checkpoint_tensors(model: Crosscoder) -> dict[str, Tensor]:
    tensors = {"encoder_bias": model.b_enc}
    for name in model.read:
        tensors[f"encoder.{name}"] = model.encoder_weight(name)
    for name in model.write:
        tensors[f"decoder.{name}"] = model.decoder_weight(name)
        tensors[f"decoder_bias.{name}"] = model.decoder_bias(name)
    for s in model.sources:
        tensors[f"input_scale.{s.name}"] = model.scale(s.name)
    if model.arch == "batchtopk":
        tensors["threshold"] = model.threshold
    if model.arch == "jumprelu":
        tensors["threshold"] = model.thresholds()
    tensors.update(model.extra_tensors())
    return {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}


def save(model: Crosscoder, path, extra: dict | None = None, overwrite: bool = True) -> Path:
    """Write the checkpoint atomically. `extra` (hyperparameters, store, training) joins the metadata."""
    meta = {**model.describe(), **(extra or {})}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(checkpoint_tensors(model), str(tmp), metadata={"xc": strict_json.dumps(meta)})
    return Path(path)


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
"""safetensors dtypes a checkpoint's tensors may have (xc writes F32)."""
MAX_LATENTS = 2 ** 31 - 1


def where(path) -> str:
    return f"checkpoint {str(path)!r}"


def read_metadata(path) -> dict:
    """The checkpoint's "xc" metadata, checked (`check_metadata`): a bad file is one BadInput naming it."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise BadInput(f"{str(path)!r} is not a safetensors checkpoint ({e})") from e
    if "xc" not in meta:
        raise BadInput(f"{str(path)!r} is a safetensors file without xc metadata; it is not an xc checkpoint")
    try:
        meta = json.loads(meta["xc"])
    except ValueError as e:
        raise BadInput(f"{where(path)}: its xc metadata is not JSON ({e})") from None
    check_metadata(meta, where(path))
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_metadata(meta, where: str) -> list[Source]:
    """Check a checkpoint's metadata against man/xc-checkpoint.5; return its sources.

    The sources follow the rule stores follow (`xcli.source.check_source`); n_latents, k, arch,
    read and write must describe a crosscoder this xc can build. Raises one BadInput naming `where`."""
    if not isinstance(meta, dict):
        raise BadInput(f"{where}: its xc metadata is {type(meta).__name__}, not a JSON object")
    version = meta.get("version")
    if meta.get("format") != CHECKPOINT_FORMAT or not _is_int(version) or not 1 <= version <= CHECKPOINT_VERSION:
        raise BadInput(f"{where} has checkpoint format {meta.get('format')!r:.40} version {version!r:.40}; "
                       f"this xc reads {CHECKPOINT_FORMAT!r} versions 1 to {CHECKPOINT_VERSION}")
    arch, n, k = meta.get("arch"), meta.get("n_latents"), meta.get("k")
    if arch not in ARCHS:
        raise BadInput(f"{where}: arch {arch!r:.40} is not known; xc reads {', '.join(ARCHS)}")
    if not (_is_int(n) and 1 <= n <= MAX_LATENTS):
        raise BadInput(f"{where}: n_latents {n!r:.40} is not a whole number from 1 to {MAX_LATENTS}")
    k_optional = arch in ("relu", *THRESHOLD_ARCHS)
    if not k_optional or k is not None:
        if not (_is_int(k) and 1 <= k < n):
            need = "a whole number" if not k_optional else "null or a whole number"
            raise BadInput(f"{where}: k {k!r:.40} is not {need} from 1 to n_latents - 1 ({n - 1}) for arch {arch}")
    listed = meta.get("sources")
    if not isinstance(listed, list) or not listed:
        raise BadInput(f"{where}: sources {listed!r:.60} is not a non-empty list of sources")
    sources = [Source.from_json(s, where) for s in listed]
    names = [s.name for s in sources]
    repeated = sorted({x for x in names if names.count(x) > 1})
    if repeated:
        raise BadInput(f"{where}: source names repeat: {', '.join(repeated)}")
    for key in ("read", "write"):
        chosen = meta.get(key)
        if not isinstance(chosen, list) or not chosen or not all(isinstance(x, str) for x in chosen):
            raise BadInput(f"{where}: {key} {chosen!r:.60} is not a non-empty list of source names")
        unknown = [x for x in chosen if x not in names]
        if unknown:
            raise BadInput(f"{where}: {key} names {unknown[0]!r:.60}, which is not among its sources "
                           f"({', '.join(names)})")
        if len(set(chosen)) != len(chosen):
            raise BadInput(f"{where}: {key} lists a source twice")
    check_provenance(meta, where)
    if meta.get("partition") is not None:
        Partition.from_json(meta["partition"], where).check(sources, meta["write"], n, where)
    if "matryoshka" in meta:
        check_matryoshka(meta, where)
    return sources


def check_matryoshka(meta: dict, where: str) -> Prefixes:
    """A Matryoshka crosscoder's record: nested prefixes of a batchtopk dictionary (man/xc-checkpoint.5)."""
    if meta["arch"] != "batchtopk":
        raise BadInput(f"{where}: a matryoshka record needs arch batchtopk (the selection it was trained with), "
                       f"not {meta['arch']!r:.40}")
    return Prefixes.from_json(meta["matryoshka"], meta["n_latents"], where)


def check_provenance(meta: dict, where: str) -> None:
    """The optional record of how the checkpoint was trained, as far as xc reads it back (`xc eval`'s
    held-out rows, `xc export`'s store, `xc train --resume`): absent, or of the documented shapes."""
    for key in ("hyperparameters", "training", "aux"):
        if key in meta and not isinstance(meta[key], dict):
            raise BadInput(f"{where}: {key} {meta[key]!r:.40} is not a JSON object")
    fraction = meta.get("hyperparameters", {}).get("eval_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                                     and 0 <= fraction < 1):
        raise BadInput(f"{where}: hyperparameters.eval_fraction {fraction!r:.40} is not a number from 0 to below 1")
    complete = meta.get("training", {}).get("complete")
    if complete is not None and not isinstance(complete, bool):
        raise BadInput(f"{where}: training.complete {complete!r:.40} is not true or false")
    if "store" not in meta:
        return
    stores = meta["store"]
    if not isinstance(stores, list) or not all(isinstance(s, dict) for s in stores):
        raise BadInput(f"{where}: store {stores!r:.60} is not a list of the stores it was trained on")
    for i, s in enumerate(stores):
        if not isinstance(s.get("path"), str):
            raise BadInput(f"{where}: store[{i}].path {s.get('path')!r:.40} is not a path")
        if "n_tokens" in s and not (_is_int(s["n_tokens"]) and s["n_tokens"] >= 0):
            raise BadInput(f"{where}: store[{i}].n_tokens {s.get('n_tokens')!r:.40} is not a whole number")
        if not isinstance(s.get("tokens_sha256"), (str, type(None))):
            raise BadInput(f"{where}: store[{i}].tokens_sha256 {s.get('tokens_sha256')!r:.40} is not a digest")


def expected_shapes(meta: dict, sources: list[Source]) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint with this (checked) metadata holds, with its shape (man/xc-checkpoint.5);
    fmx factors (whose shapes `xcli.crosscoder.fmx.load_factors` checks) as None."""
    d, n = {s.name: s.d for s in sources}, meta["n_latents"]
    shapes = {"encoder_bias": (n,)}
    shapes.update({f"encoder.{x}": (d[x], n) for x in meta["read"]})
    for x in meta["write"]:
        shapes[f"decoder.{x}"], shapes[f"decoder_bias.{x}"] = (n, d[x]), (d[x],)
    shapes.update({f"input_scale.{s.name}": () for s in sources})
    if meta["arch"] == "batchtopk":
        shapes["threshold"] = ()
    if meta["arch"] == "jumprelu":
        shapes["threshold"] = (n,)
    if "fmx" in meta:
        shapes.update({f"fmx.{part}.{mode}": None for part in ("encoder", "decoder")
                       for mode in ("layer", "activation", "latent")})
    return shapes


def shape_text(shape) -> str:
    return str(tuple(shape))


def check_tensors(f, expected: dict, where: str) -> None:
    """The open safetensors file `f` holds exactly the `expected` tensors ({name: shape or None}),
    each of a floating dtype and, where given, of exactly that shape."""
    names = set(f.keys())
    missing = [x for x in expected if x not in names]
    if missing:
        raise BadInput(f"{where}: tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)"
                                                                     if len(missing) > 1 else ""))
    extra = sorted(names - set(expected))
    if extra:
        raise BadInput(f"{where}: tensor {extra[0]!r:.80} is not part of a checkpoint with this metadata")
    for name, shape in expected.items():
        info = f.get_slice(name)
        if info.get_dtype() not in FLOAT_DTYPES:
            raise BadInput(f"{where}: tensor {name} has dtype {info.get_dtype()}, expected a float "
                           f"({', '.join(FLOAT_DTYPES)})")
        if shape is not None and tuple(info.get_shape()) != tuple(shape):
            raise BadInput(f"{where}: tensor {name} has shape {shape_text(info.get_shape())}, "
                           f"expected {shape_text(shape)}")


def finite_tensor(f, name: str, where: str) -> Tensor:
    tensor = f.get_tensor(name)
    if not torch.isfinite(tensor).all():
        raise BadInput(f"{where}: tensor {name} holds non-finite values (NaN or inf)")
    return tensor


def warn_if_unfinished(meta: dict, path) -> None:
    """A checkpoint saved mid-run (training.complete false) is usable, but say so: its results are provisional."""
    training = meta.get("training")
    if isinstance(training, dict) and training.get("complete") is False:
        step, steps = training.get("step"), training.get("steps")
        at = f" (step {step} of {steps})" if isinstance(step, int) and isinstance(steps, int) else ""
        console.warn(f"{where(path)} is from an unfinished training run{at}; results describe a partly trained "
                     f"crosscoder (finish it with xc train --resume)")


def load(path, device: str | torch.device = "cpu") -> Crosscoder:
    """Open a checkpoint as a Crosscoder in eval mode (BatchTopK uses its threshold).

    The file is untrusted: its metadata, tensor names, shapes, dtypes and values are checked
    first, and anything wrong is one BadInput naming the checkpoint."""
    meta = read_metadata(path)
    sources = check_metadata(meta, where(path))
    warn_if_unfinished(meta, path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        check_tensors(f, expected_shapes(meta, sources), where(path))
        model = Crosscoder(sources, meta["n_latents"], meta["arch"], meta.get("k"), meta["read"], meta["write"])

        def get(name):
            return finite_tensor(f, name, where(path))

        with torch.no_grad():
            model.b_enc.copy_(get("encoder_bias"))
            for name in model.read:
                model.encoder_weight(name).copy_(get(f"encoder.{name}"))
            for name in model.write:
                model.decoder_weight(name).copy_(get(f"decoder.{name}"))
                model.decoder_bias(name).copy_(get(f"decoder_bias.{name}"))
            for i, s in enumerate(sources):
                model.input_scale[i] = get(f"input_scale.{s.name}")
                if not model.input_scale[i] > 0:
                    raise BadInput(f"{where(path)}: tensor input_scale.{s.name} is {float(model.input_scale[i])}, "
                                   f"expected a scale above 0")
            if model.arch == "batchtopk":
                model.threshold.copy_(get("threshold"))
            if model.arch == "jumprelu":
                theta = get("threshold")
                if bool((theta < 0).any()):
                    i = int((theta < 0).nonzero()[0, 0])
                    raise BadInput(f"{where(path)}: tensor threshold holds {float(theta[i]):.6g} at latent {i}; "
                                   f"JumpReLU thresholds must be 0 or more")
                model.set_thresholds(theta)
    if meta.get("partition") is not None:
        model.partition = Partition.from_json(meta["partition"], where(path))
        model.partition.check_weights(model, where(path))
    if "matryoshka" in meta:
        model.matryoshka = check_matryoshka(meta, where(path))
    model.metadata = meta
    return model.eval().to(device)
