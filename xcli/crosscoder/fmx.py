"""fmxcoders: factorized masked crosscoders (Demou et al. 2026).

A cross-layer crosscoder over L layers of one model, all of width d, has an encoder
tensor W_enc[l, a, i] and a decoder tensor W_dec[l, a, i] (layer x activation x
latent; `decoder.<source>` is W_dec[l].T). An fmxcoder holds each of the two as a
low-rank factorization instead of L free (d, F) matrices:

    tr, ranks (R1, R2, R3):   W[l, a, i] = trace( layer[l] @ activation[a] @ latent[i] )
                              layer (L, R1, R2), activation (d, R2, R3), latent (F, R3, R1)
    cp, rank R:               W[l, a, i] = sum_r layer[l, r] * activation[a, r] * latent[i, r]
                              layer (L, R), activation (d, R), latent (F, R)

Either way latent i's weights at layer l are one fixed set of coefficients
(latent[i]) on a basis that depends on the layer (layer[l] with activation): a
cross-layer basis shared by all latents. Everything else (biases, input scales,
activation, loss) is the standard crosscoder's.

Stochastic layer masking, the other half of the method: at every training step each
(token, layer) encoder input is zeroed with probability p, while the loss still
reconstructs the clean activations. `layer_keep` draws the mask from (seed, step)
alone, so a resumed run masks exactly as an uninterrupted one.

The checkpoint holds the effective `encoder.<source>` / `decoder.<source>` tensors
(so `xcli.load` and every other reader see an ordinary crosscoder) and the factors
as `fmx.{encoder,decoder}.{layer,activation,latent}`; `load_factors` reopens those.
"""

import math

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from xcli.crosscoder import sparse
from xcli.crosscoder.config import DEFAULT_MASK_PROB, FACTORIZATIONS, check_ranks, is_fmx
from xcli.crosscoder.model import Crosscoder, check_tensors, finite_tensor, load, read_metadata, where
from xcli.errors import BadInput
from xcli.source import Source

MODES = ("layer", "activation", "latent")
FORMULAS = {
    "tr": "W[l,a,i] = trace(layer[l] @ activation[a] @ latent[i]); layer (L,R1,R2), activation (d,R2,R3), "
          "latent (F,R3,R1)",
    "cp": "W[l,a,i] = sum_r layer[l,r] activation[a,r] latent[i,r]; layer (L,R), activation (d,R), latent (F,R)",
}


def default_ranks(factorization: str, total_width: int) -> tuple[int, ...]:
    """Ranks when --ranks is not given, from the summed width L * d of the layers.

    tr: R1 = R2 = R3 = ceil(sqrt(L * d)); cp: R = L * d. Either way the joint (L * d, F) map
    can have full rank (its rank is at most R1 * R3, or R), so the factorization constrains how
    layers share weights rather than capacity; lower ranks trade reconstruction for coherence
    (docs/fmxcoders.md). The paper does not say which ranks it used.
    """
    if factorization == "tr":
        r = math.ceil(math.sqrt(total_width))
        return r, r, r
    return (total_width,)


# -- the factorized tensor -------------------------------------------------------------------------

class Factorized(nn.Module):
    """One (layer x activation x latent) weight tensor held as tensor-ring or CP factors."""

    def __init__(self, factorization: str, n_layers: int, d: int, n_latents: int, ranks: tuple[int, ...]):
        super().__init__()
        if factorization not in FACTORIZATIONS:
            raise BadInput(f"--factorization {factorization!r} is not known; use one of {', '.join(FACTORIZATIONS)}")
        self.factorization, self.ranks = factorization, check_ranks(factorization, ranks)
        if factorization == "tr":
            r1, r2, r3 = self.ranks
            shapes = (n_layers, r1, r2), (d, r2, r3), (n_latents, r3, r1)
        else:
            (r,) = self.ranks
            shapes = (n_layers, r), (d, r), (n_latents, r)
        self.layer, self.activation, self.latent = (nn.Parameter(torch.zeros(s)) for s in shapes)

    def basis(self) -> Tensor:
        """(L·d, R) with W[l, a, :] = basis[l·d + a] @ latent_matrix().T: the rank-R map behind the tensor
        (R = R3·R1 for tr, R for cp)."""
        L, d = self.layer.shape[0], self.activation.shape[0]
        if self.factorization == "tr":  # basis[l, a, r, p] = sum_q layer[l, p, q] activation[a, q, r]
            return torch.einsum("lpq,aqr->larp", self.layer, self.activation).reshape(L * d, -1)
        return (self.layer[:, None, :] * self.activation[None, :, :]).reshape(L * d, -1)

    def latent_matrix(self) -> Tensor:
        """(F, R): the latent factor as one row of coefficients on the basis per latent."""
        return self.latent.reshape(self.latent.shape[0], -1)

    def tensor(self) -> Tensor:
        """The full tensor W[l, a, i], shape (L, d, F): one matrix product of basis and latent factor."""
        L, d, F = self.layer.shape[0], self.activation.shape[0], self.latent.shape[0]
        return (self.basis() @ self.latent_matrix().T).view(L, d, F)

    @property
    def rank(self) -> int:
        """R, the inner width of basis @ latent_matrix().T."""
        return self.latent[0].numel()

    @torch.no_grad()
    def init_random(self, generator: torch.Generator | None, norm: float) -> None:
        """Gaussian factors of equal scale, then rescaled so that every (layer, latent) weight
        vector has a norm close to `norm` (layers first, then latents: both enter linearly)."""
        d = self.activation.shape[0]
        std = (norm ** 2 / (d * math.prod(self.ranks))) ** (1 / 6)  # entries of W then have variance norm²/d
        for p in (self.layer, self.activation, self.latent):
            p.copy_(torch.randn(p.shape, generator=generator) * std)
        for factor, dim in ((self.layer, 1), (self.latent, 0)):
            mean_norm = self.tensor().norm(dim=1).mean(dim=dim)  # per layer, then per latent
            factor.mul_((norm / mean_norm.clamp_min(1e-30)).view(-1, *[1] * (factor.dim() - 1)))


# -- the model -------------------------------------------------------------------------------------

class FmxCrosscoder(Crosscoder):
    """A Crosscoder whose per-source W_enc / W_dec are computed from tensor factors.

    `W_enc` and `W_dec` are lists of effective (d, F) and (F, d) tensors, so every method of
    Crosscoder works unchanged. A training step on the sparse path (topk, batchtopk) need not form
    them with grad: `sparse_weights` contracts the factors with the batch where that is cheaper.
    They are computed once and cached until the factors change: after a backward pass reaches
    them (the cache follows gradient accumulation, since fused Adam updates in place without
    bumping tensor versions), after an in-place edit, after a move to another device, or when
    grad mode changes.
    """

    factorized = True
    contracted_parts: tuple[str, ...] | None = None
    """Which of "enc", "dec" a training step contracts with the batch instead of materialising (tests and
    benchmarks set it); None: whichever the cost model (`contracts`) finds cheaper."""

    def __init__(self, sources: list[Source], n_latents: int, arch: str = "batchtopk", k: int | None = None,
                 read: list[str] | None = None, write: list[str] | None = None, factorization: str = "tr",
                 ranks: tuple[int, ...] | None = None):
        super().__init__(sources, n_latents, arch, k, read, write)
        width = check_layers(self.sources, self.read)
        ranks = check_ranks(factorization, ranks or default_ranks(factorization, width * len(self.sources)))
        self.d = width
        self.enc = Factorized(factorization, len(self.read), width, n_latents, ranks)
        self.dec = Factorized(factorization, len(self.write), width, n_latents, ranks)
        self.factorization, self.ranks = factorization, self.enc.ranks
        self._cache, self._generation = {}, 0
        self._watch_factors()

    def factors(self) -> list[nn.Parameter]:
        return [*self.enc.parameters(), *self.dec.parameters()]

    def _watch_factors(self) -> None:
        for p in self.factors():
            p.register_post_accumulate_grad_hook(self._factor_changed)

    def _factor_changed(self, _param) -> None:
        self._generation += 1

    def effective(self, part: str) -> list[Tensor]:
        """The per-source tensors of "enc" ([W_enc^s (d, F)] per read source) or "dec"
        ([W_dec^s (F, d)] per written source), float32, cached until the factors change."""
        factors = getattr(self, part)
        key = (torch.is_grad_enabled(), self._generation,
               tuple((p.data_ptr(), p._version) for p in factors.parameters()))
        cached = self._cache.get(part)
        if cached is None or cached[0] != key:
            with torch.autocast(self.b_enc.device.type, enabled=False):
                w = factors.tensor()  # (L, d, F)
            tensors = list(w.unbind(0)) if part == "enc" else list(w.transpose(1, 2).contiguous().unbind(0))
            cached = self._cache[part] = (key, tensors)
        return cached[1]

    # -- the training step (the sparse path, xcli.crosscoder.sparse) ------------------------------
    def contracts(self, part: str, rows: int) -> bool:
        """Whether a training step on B = `rows` tokens contracts `part`'s factors with the batch rather than
        materialising W with grad. In multiply-adds, forward and backward, for D = L·d, F latents, rank R:

            enc  materialised: 3·D·F·R + B·D·F        contracted: 2·B·D·R + B·R·F
            dec  materialised: 3·D·F·R                contracted: D·F·R + 2·min(B, u)·D·R

        (u: the latents selected in the batch; the contracted decoder still computes W once, without
        grad, for the selection's norms), so the decoder is always contracted."""
        if self.contracted_parts is not None:
            return part in self.contracted_parts
        if part == "dec":
            return True
        D, F, R = len(self.read) * self.d, self.n_latents, self.enc.rank
        return 2 * rows * D * R + rows * R * F < 3 * D * F * R + rows * D * F

    def sparse_weights(self, x: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Crosscoder.sparse_weights from the factors, in float32. A contracted encoder's input is
        z = x @ basis (B, R) and its weight the latent factor; a contracted decoder is W computed without
        grad, whose decode (`sparse_decode`) sends the gradient to the factors. Otherwise, and always
        without grad (inference), the effective tensors (computed once and cached)."""
        rows, grad = x[self.read[0]].shape[0], torch.is_grad_enabled()
        with torch.autocast(self.b_enc.device.type, enabled=False):
            if grad and self.contracts("enc", rows):
                x_cat = torch.cat([x[name].float() * self.scale(name) for name in self.read], dim=1)
                xs, enc = [x_cat @ self.enc.basis()], [self.enc.latent_matrix().T]
            else:
                enc = list(self.W_enc)
                xs = [x[name].to(w.dtype) * self.scale(name) for name, w in zip(self.read, enc)]
            if grad and self.contracts("dec", rows):
                basis, latent = self.dec.basis(), self.dec.latent_matrix()
                with torch.no_grad():
                    dec = ContractedDecoder(latent @ basis.T, basis, latent, self.d)
            else:
                dec = list(self.W_dec)
        return xs, enc, dec

    def sparse_decode(self, pairs, values: Tensor, decoder: list[Tensor]) -> list[Tensor]:
        if isinstance(decoder, ContractedDecoder):
            return list(sparse.decode_low_rank(pairs, values, decoder.table, decoder.basis, decoder.latent)
                        .split(self.d, dim=1))
        return super().sparse_decode(pairs, values, decoder)

    @property
    def W_enc(self) -> list[Tensor]:
        return self.effective("enc")

    @property
    def W_dec(self) -> list[Tensor]:
        return self.effective("dec")

    def __getstate__(self):  # the cache may hold an autograd graph, which cannot be copied
        return {**self.__dict__, "_cache": {}}

    def __setstate__(self, state):  # copies (deepcopy, pickle) get new parameters without our hooks
        super().__setstate__(state)
        self._watch_factors()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, decoder_norm: float = 0.1) -> None:
        """Random factors with decoder rows of norm about `decoder_norm`; encoder = decoder^T
        when the crosscoder reads what it writes (as Crosscoder.init_weights)."""
        self.dec.init_random(generator, decoder_norm)
        if self.read == self.write:
            for mine, theirs in zip(self.enc.parameters(), self.dec.parameters()):
                mine.copy_(theirs)
        else:
            self.enc.init_random(generator, decoder_norm)
        self.b_enc.zero_()
        for b in self.b_dec:
            b.zero_()

    def extra_tensors(self) -> dict[str, Tensor]:
        return {f"fmx.{part}.{mode}": getattr(factors, mode)
                for part, factors in (("encoder", self.enc), ("decoder", self.dec)) for mode in MODES}

    def describe(self) -> dict:
        return {**super().describe(), "fmx": {
            "factorization": self.factorization, "ranks": list(self.ranks), "d": self.d,
            "encoder_layers": self.read, "decoder_layers": self.write, "formula": FORMULAS[self.factorization],
            "tensors": sorted(self.extra_tensors()),
        }}


class ContractedDecoder(list):
    """A training step's decoder weights per written source, (F, d) views of `table` = latent @ basis.T
    (computed without grad), which also carries the factors its decode sends the gradient to."""

    def __init__(self, table: Tensor, basis: Tensor, latent: Tensor, d: int):
        super().__init__(table.split(d, dim=1))
        self.table, self.basis, self.latent = table, basis, latent


def check_layers(sources: list[Source], read: list[str]) -> int:
    """The common width of an fmxcoder's sources; refuse sources it cannot factorize."""
    widths = {s.name: s.d for s in sources}
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{n} ({d})" for n, d in widths.items())
        raise BadInput(f"--arch fmx factorizes over layers of one width (one model); the sources have widths "
                       f"{listed}: choose sources of one width with --sources")
    if len(read) < 2:
        raise BadInput(f"--arch fmx factorizes over layers: it needs at least two sources to read, got {len(read)}")
    return next(iter(widths.values()))


def load_factors(path, device: str | torch.device = "cpu") -> FmxCrosscoder:
    """Open an fmx checkpoint with its factors (for inspection or further training).

    `xcli.load` opens the same file as a plain Crosscoder from the effective tensors,
    which is all inference needs.
    """
    meta = read_metadata(path)
    if "fmx" not in meta:
        raise BadInput(f"{str(path)!r} is not an fmx checkpoint (no 'fmx' metadata); open it with xcli.load")
    plain = load(path)
    fmx = check_fmx_metadata(meta, plain, where(path))
    model = FmxCrosscoder(plain.sources, plain.n_latents, plain.arch, plain.k, plain.read, plain.write,
                          fmx["factorization"], tuple(fmx["ranks"]))
    with torch.no_grad(), safe_open(str(path), framework="pt", device="cpu") as f:
        factors = model.extra_tensors()
        check_tensors(f, {**dict.fromkeys(f.keys()), **{k: v.shape for k, v in factors.items()}}, where(path))
        for name, tensor in factors.items():
            tensor.copy_(finite_tensor(f, name, where(path)))
        model.b_enc.copy_(plain.b_enc)
        for mine, theirs in zip(model.b_dec, plain.b_dec):
            mine.copy_(theirs)
        model.input_scale.copy_(plain.input_scale)
        model.threshold.copy_(plain.threshold)
    model.metadata = meta
    return model.eval().to(device)


def check_fmx_metadata(meta: dict, plain: Crosscoder, where: str) -> dict:
    """The checkpoint's "fmx" object, checked against its (already checked) crosscoder metadata."""
    fmx = meta["fmx"]
    if not isinstance(fmx, dict):
        raise BadInput(f"{where}: its fmx metadata is not an object")
    factorization, ranks = fmx.get("factorization"), fmx.get("ranks")
    if factorization not in FACTORIZATIONS:
        raise BadInput(f"{where}: fmx.factorization {factorization!r:.40} is not known; "
                       f"xc reads {', '.join(FACTORIZATIONS)}")
    want = 3 if factorization == "tr" else 1
    if not (isinstance(ranks, list) and len(ranks) == want
            and all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= 2 ** 20 for r in ranks)):
        raise BadInput(f"{where}: fmx.ranks {ranks!r:.60} is not a list of {want} whole numbers >= 1 "
                       f"for factorization {factorization}")
    widths = {s.d for s in plain.sources}
    if len(widths) != 1 or len(plain.read) < 2 or fmx.get("d") != next(iter(widths)):
        raise BadInput(f"{where}: fmx metadata needs at least two read sources of one width d; it has widths "
                       f"{', '.join(str(s.d) for s in plain.sources)}, fmx.d {fmx.get('d')!r:.20} and "
                       f"{len(plain.read)} read")
    if fmx.get("encoder_layers") != plain.read or fmx.get("decoder_layers") != plain.write:
        raise BadInput(f"{where}: fmx.encoder_layers and fmx.decoder_layers must be its read and write lists")
    return fmx


# -- stochastic layer masking ----------------------------------------------------------------------

def layer_keep(rows: int, n_layers: int, p: float, seed: int, step: int) -> Tensor:
    """Which encoder inputs survive masking at one training step: (rows, n_layers) bool,
    each independently False with probability p. A pure function of (seed, step)."""
    return torch.from_numpy(np.random.default_rng([seed, 3, step]).random((rows, n_layers)) >= p)


def mask_layers(x: dict[str, Tensor], names: list[str], keep: Tensor) -> dict[str, Tensor]:
    """A copy of x in which source names[j] is zeroed on the rows where keep[:, j] is False."""
    out = dict(x)
    for j, name in enumerate(names):
        kept = keep[:, j:j + 1].to(x[name].device, non_blocking=True)
        out[name] = torch.where(kept, x[name], torch.zeros((), dtype=x[name].dtype, device=x[name].device))
    return out


# -- training options (called by xcli.train.loop) -------------------------------------------------------

def resolve_options(arch: str, factorization: str | None, ranks, mask_prob: float | None,
                    sources: list[Source], read: list[str]) -> dict:
    """The resolved fmx fields of a TrainConfig, for the sources it trains on."""
    if not is_fmx(arch):
        return {"mask_prob": mask_prob or 0.0}
    width = check_layers(sources, read)
    factorization = factorization or "tr"
    return {"factorization": factorization,
            "ranks": check_ranks(factorization, ranks or default_ranks(factorization, width * len(sources))),
            "mask_prob": DEFAULT_MASK_PROB if mask_prob is None else mask_prob}
