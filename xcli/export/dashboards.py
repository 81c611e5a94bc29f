"""Per-latent dashboard statistics, streamed over an activation store.

Every pass reads the store block by block (one Zarr chunk at a time) and encodes
the rows with the crosscoder, keeping only the chosen latents:

1. a running top-k of (activation, row) per latent, the count of non-zero
   activations, and the smallest and largest non-zero value;
2. (needs the min and max from pass 1) a 50-bin histogram of the non-zero values
   over [min, max], and interval samples: the non-zero activations of a latent
   fall into 5 equal-width intervals of (0, max] (interval j holds v with
   j <= 5 v / max < j + 1; the top one includes max); each interval counts its
   members and keeps 5 of them: the ones with the smallest pseudo-random key
   hash(row, latent) ("bottom-k" sampling: uniform, independent of batch sizes
   and of which other latents are exported, and the same on every run);
3. context windows: for each chosen example, the rows of the same document in
   the same sequence around it (`context_starts`), re-encoded to read the
   latent's value on every token.

Passes 1 and 2 keep O(F·k) numbers, never a (tokens, F) matrix. Pass 3 holds the
windows of one group of latents at a time (WINDOW_BUDGET values), re-encoding
the blocks those windows touch once per group.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from xcli import console
from xcli.data.store import ActivationStore
from xcli.errors import XcError
from xcli.files import atomic_path

N_BINS = 50
N_INTERVALS = 5
PER_INTERVAL = 5
ENCODE_BUDGET = 1 << 25  # latent values per encode step (rows x latents): 128 MB of float32
WINDOW_BUDGET = 1 << 28  # window values held at once in pass 3 (examples x window): 1 GB of float32
NO_ROW = -1
KEY_MAX = torch.iinfo(torch.int64).max
_MASK32 = 0xFFFFFFFF


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer, computed in int64 so that no product overflows."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def sample_key(rows: Tensor, latents: Tensor) -> Tensor:
    """The sampling key of (row, latent): lowest keys are chosen. Unique for stores under 2**31 rows."""
    return (hash32(hash32(rows) ^ latents) << 31) | (rows & 0x7FFFFFFF)


class LatentEncoder:
    """Raw store rows -> activations of chosen latents, shape (rows, len(latents)).

    ReLU, BatchTopK (at inference, a per-latent threshold) and JumpReLU encode each latent on
    its own, so only the chosen encoder columns are multiplied; TopK needs all
    latents to pick the k best, so it encodes everything and selects.
    """

    def __init__(self, model, latents: np.ndarray, device: torch.device):
        self.model, self.device = model, device
        self.latents = torch.as_tensor(np.asarray(latents), dtype=torch.long, device=device)
        self.everything = len(latents) == model.n_latents
        if not self.everything and model.arch != "topk":
            with torch.no_grad():
                self.W = [model.encoder_weight(n)[:, self.latents].contiguous() for n in model.read]
                self.b = model.b_enc[self.latents]
                self.norm_sum = model.decoder_norms().sum(dim=1)[self.latents]
                if model.arch == "jumprelu":
                    self.theta = model.thresholds()[self.latents]

    @torch.no_grad()
    def __call__(self, x: dict[str, np.ndarray]) -> Tensor:
        xs = {n: torch.from_numpy(x[n]).to(self.device) for n in self.model.read}
        if self.everything:
            return self.model.encode(xs, batch_select=False)
        if self.model.arch == "topk":
            return self.model.encode(xs, batch_select=False)[:, self.latents]
        pre = self.b
        for name, w in zip(self.model.read, self.W):
            pre = pre + (xs[name].to(w.dtype) * self.model.scale(name)) @ w
        if self.model.arch == "jumprelu":
            return pre * (pre > self.theta)
        f = torch.relu(pre)
        if self.model.arch == "batchtopk":
            f = f * (f * self.norm_sum > self.model.threshold)
        return f


def encode_blocks(store: ActivationStore, encoder: LatentEncoder, blocks=None, wanted=None):
    """Yield (first_row, activations) over the store, one encode step at a time.

    Steps partition each store chunk the same way on every pass and every run, so
    the same rows always meet the same matmul shapes. `blocks` restricts the chunks
    read; `wanted(start, stop)` skips steps that hold nothing of interest.
    """
    n_sel = max(1, len(encoder.latents))
    step = max(1, min(store.chunk_rows, ENCODE_BUDGET // n_sel))
    names = encoder.model.read
    for block in (range(store.n_chunks) if blocks is None else blocks):
        b0 = block * store.chunk_rows
        b1 = min(b0 + store.chunk_rows, store.n_tokens)
        steps = [(s, min(s + step, b1)) for s in range(b0, b1, step)]
        if wanted is not None:
            steps = [(s0, s1) for s0, s1 in steps if wanted(s0, s1)]
        if not steps:
            continue
        rows = store.read_rows(b0, b1, names)
        for s0, s1 in steps:
            f = encoder({n: rows[n][s0 - b0:s1 - b0] for n in names})
            if not torch.isfinite(f.sum()):  # one reduction; NaN and inf both reach the sum
                raise XcError(f"the crosscoder gives non-finite activations on store rows {s0}-{s1}; "
                              f"the checkpoint or the store holds NaN or inf")
            yield s0, f


@dataclass
class DashboardStats:
    """Everything passes 1 and 2 learn, per chosen latent (row i describes latents[i])."""

    latents: np.ndarray  # (n,) latent indices
    n_tokens: int
    top_values: Tensor  # (n, k) float32, descending; 0 where fewer than k non-zero activations
    top_rows: Tensor  # (n, k) int64 store rows, NO_ROW where none
    nonzero: Tensor  # (n,) int64 count of non-zero activations
    min_nonzero: Tensor  # (n,) float32 (0 for a dead latent)
    max_nonzero: Tensor  # (n,) float32
    hist: Tensor | None = None  # (n, N_BINS) int64
    interval_counts: Tensor | None = None  # (n, N_INTERVALS) int64
    sample_rows: Tensor | None = None  # (n, N_INTERVALS, PER_INTERVAL) int64, NO_ROW where none
    sample_values: Tensor | None = None  # (n, N_INTERVALS, PER_INTERVAL) float32

    @property
    def passes_done(self) -> int:
        return 1 if self.hist is None else 2

    def save(self, path) -> None:
        tensors = {k: v.contiguous() for k, v in vars(self).items() if isinstance(v, Tensor)}
        tensors["latents"] = torch.from_numpy(self.latents.astype(np.int64))
        with atomic_path(path, overwrite=True) as tmp:
            save_file(tensors, str(tmp), metadata={"n_tokens": str(self.n_tokens)})

    @classmethod
    def load(cls, path) -> "DashboardStats":
        with safe_open(str(path), framework="pt") as f:
            n_tokens = int(f.metadata()["n_tokens"])
        t = load_file(str(path))
        latents = t.pop("latents").numpy()
        return cls(latents=latents, n_tokens=n_tokens, **t)

    def bin_edges(self, i: int) -> tuple[float, float]:
        """The histogram range of latent row i: [min, max] of its non-zero values (widened if a point)."""
        lo, hi = self.min_nonzero[i].double(), self.max_nonzero[i].double()
        return float(lo), float(lo + bin_width(lo, hi))


def bin_width(lo: Tensor, hi: Tensor) -> Tensor:
    """hi - lo, or a tiny width where all values are equal (so that they land in the first bin)."""
    return torch.where(hi > lo, hi - lo, 1e-6 * lo.abs().clamp(min=1.0))


def row_histograms(values: Tensor, bins: int = N_BINS) -> tuple[Tensor, Tensor]:
    """Counts (n, bins) of each row over its own [min, max], and the bin centres (n, bins)."""
    v = values.double()
    lo, hi = v.min(dim=1).values, v.max(dim=1).values
    width = bin_width(lo, hi)
    index = ((v - lo[:, None]) / width[:, None] * bins).floor().long().clamp_(0, bins - 1)
    counts = torch.zeros((v.shape[0], bins), dtype=torch.long, device=v.device).scatter_add_(
        1, index, torch.ones_like(index))
    centres = lo[:, None] + (torch.arange(bins, device=v.device, dtype=torch.float64) + 0.5) * width[:, None] / bins
    return counts, centres


def first_pass(store: ActivationStore, model, latents: np.ndarray, k: int, device) -> DashboardStats:
    """Top-k examples, non-zero counts and the non-zero range of every chosen latent."""
    n = len(latents)
    encoder = LatentEncoder(model, latents, device)
    top_values = torch.zeros((n, k), device=device)
    top_rows = torch.full((n, k), NO_ROW, dtype=torch.long, device=device)
    nonzero = torch.zeros(n, dtype=torch.long, device=device)
    lowest = torch.full((n,), float("inf"), device=device)
    bar = console.progress(total=store.n_tokens, desc="export: top examples", unit="tok")
    for start, f in encode_blocks(store, encoder):
        f = f.T.contiguous()  # (latents, rows): reductions along rows run over contiguous memory
        active = f > 0
        nonzero += active.sum(dim=1)
        lowest = torch.minimum(lowest, f.masked_fill(~active, float("inf")).amin(dim=1))
        # Only latents with a value above their current k-th best can change their top-k;
        # once the store is warm that is a small share, so most rows skip the topk.
        hot = (f > top_values[:, -1:]).any(dim=1).nonzero().squeeze(1)
        if len(hot):
            batch = f[hot].topk(min(k, f.shape[1]), dim=1)
            values = torch.cat([top_values[hot], batch.values], dim=1)
            rows = torch.cat([top_rows[hot], batch.indices + start], dim=1)
            best = values.topk(k, dim=1)
            top_values[hot], top_rows[hot] = best.values, rows.gather(1, best.indices)
        bar.update(f.shape[1])
    bar.close()
    top_rows = torch.where(top_values > 0, top_rows, NO_ROW)
    top_values = torch.where(top_values > 0, top_values, 0.0)
    lowest = torch.where(nonzero > 0, lowest, 0.0)
    return DashboardStats(latents=np.asarray(latents), n_tokens=store.n_tokens, top_values=top_values.cpu(),
                          top_rows=top_rows.cpu(), nonzero=nonzero.cpu(), min_nonzero=lowest.cpu(),
                          max_nonzero=top_values[:, 0].cpu())


def group_ranks(groups: Tensor) -> Tensor:
    """Position of each element inside its run of equal values (groups must be sorted)."""
    idx = torch.arange(len(groups), device=groups.device)
    starts = torch.ones_like(groups, dtype=torch.bool)
    starts[1:] = groups[1:] != groups[:-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=0).values


def second_pass(store: ActivationStore, model, stats: DashboardStats, device) -> DashboardStats:
    """Histograms, interval counts and interval samples (needs stats from the first pass)."""
    n = len(stats.latents)
    encoder = LatentEncoder(model, stats.latents, device)
    latent_ids = torch.as_tensor(stats.latents, dtype=torch.long, device=device)
    lo = stats.min_nonzero.double().to(device)
    hi = stats.max_nonzero.double().to(device)
    width = bin_width(lo, hi)
    hist = torch.zeros(n * N_BINS, dtype=torch.long, device=device)
    counts = torch.zeros(n * N_INTERVALS, dtype=torch.long, device=device)
    keys = torch.full((n * N_INTERVALS, PER_INTERVAL), KEY_MAX, dtype=torch.long, device=device)
    rows = torch.full_like(keys, NO_ROW)
    values = torch.zeros(keys.shape, device=device)
    bar = console.progress(total=store.n_tokens, desc="export: histograms and samples", unit="tok")
    for start, f in encode_blocks(store, encoder):
        r, c = (f > 0).nonzero(as_tuple=True)
        v = f[r, c]
        v64 = v.double()
        bins = ((v64 - lo[c]) / width[c] * N_BINS).floor().long().clamp_(0, N_BINS - 1)
        hist.index_add_(0, c * N_BINS + bins, torch.ones_like(bins))
        interval = (v64 / hi[c] * N_INTERVALS).floor().long().clamp_(0, N_INTERVALS - 1)
        group = c * N_INTERVALS + interval
        counts.index_add_(0, group, torch.ones_like(group))
        # Keep the PER_INTERVAL lowest keys of each (latent, interval) seen in this step ...
        row = r + start
        key = sample_key(row, latent_ids[c])
        order = key.argsort()
        order = order[group[order].argsort(stable=True)]
        g_sorted = group[order]
        rank = group_ranks(g_sorted)
        keep = order[rank < PER_INTERVAL]
        rank = rank[rank < PER_INTERVAL]
        if len(keep) == 0:
            bar.update(f.shape[0])
            continue
        touched, slot = group[keep].unique(return_inverse=True)
        new_keys = torch.full((len(touched), PER_INTERVAL), KEY_MAX, dtype=torch.long, device=device)
        new_rows = torch.full_like(new_keys, NO_ROW)
        new_values = torch.zeros(new_keys.shape, device=device)
        new_keys[slot, rank], new_rows[slot, rank], new_values[slot, rank] = key[keep], row[keep], v[keep]
        # ... and merge them with the samples kept so far.
        all_keys = torch.cat([keys[touched], new_keys], dim=1)
        best = all_keys.argsort(dim=1)[:, :PER_INTERVAL]
        keys[touched] = all_keys.gather(1, best)
        rows[touched] = torch.cat([rows[touched], new_rows], dim=1).gather(1, best)
        values[touched] = torch.cat([values[touched], new_values], dim=1).gather(1, best)
        bar.update(f.shape[0])
    bar.close()
    stats.hist = hist.view(n, N_BINS).cpu()
    stats.interval_counts = counts.view(n, N_INTERVALS).cpu()
    stats.sample_rows = rows.view(n, N_INTERVALS, PER_INTERVAL).cpu()
    stats.sample_values = values.view(n, N_INTERVALS, PER_INTERVAL).cpu()
    return stats


@dataclass
class Examples:
    """The examples of a set of latents, with their context windows (one row per example)."""

    position: np.ndarray  # index into stats.latents
    interval: np.ndarray  # -1 for a top example, else the interval 0..4
    rank: np.ndarray  # order inside its group
    row: np.ndarray  # the store row that selected the example
    start: np.ndarray  # window rows [start, stop), all of one sequence
    stop: np.ndarray
    values: np.ndarray | None = None  # (n_examples, max window) activations, filled by `read_windows`

    def __len__(self) -> int:
        return len(self.row)


def choose_examples(stats: DashboardStats, positions: np.ndarray, run_starts: np.ndarray,
                    n_tokens: int, before: int, after: int) -> Examples:
    """Top examples (by value) then interval samples (top interval first, by value) of each latent.

    Examples come sorted by position, so one latent's examples are a contiguous run. A window
    stays inside the run of rows (`run_starts`: their first rows, e.g. `context_starts`) that
    holds its example.
    """
    cols = {k: [] for k in ("position", "interval", "rank", "row")}

    def add(position, interval, rows):
        cols["position"] += [position] * len(rows)
        cols["interval"] += [interval] * len(rows)
        cols["rank"] += list(range(len(rows)))
        cols["row"] += rows

    for p in np.sort(positions):
        top = stats.top_rows[p]
        add(int(p), -1, [int(r) for r in top[top >= 0]])
        for j in reversed(range(N_INTERVALS)):
            rows, values = stats.sample_rows[p, j], stats.sample_values[p, j]
            order = torch.argsort(values[rows >= 0], descending=True, stable=True)
            add(int(p), j, [int(r) for r in rows[rows >= 0][order]])
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}
    row = arrays["row"]
    run = np.searchsorted(run_starts, row, side="right") - 1
    run_start = run_starts[run]
    run_stop = np.append(run_starts[1:], n_tokens)[run]
    start = np.maximum(row - before, run_start)
    stop = np.minimum(row + after + 1, run_stop)
    return Examples(**arrays, start=start, stop=stop)


def sequence_starts(sequence: np.ndarray) -> np.ndarray:
    """First row of every run of equal sequence ids."""
    return np.flatnonzero(np.r_[True, sequence[1:] != sequence[:-1]]) if len(sequence) else np.zeros(0, np.int64)


def context_starts(sequence: np.ndarray, position: np.ndarray, tokens: np.ndarray | None = None,
                   separator=(), prefix: int = 0, suffix: int = 0) -> np.ndarray:
    """First row of every run of rows that is one document inside one window: what a context may show.

    xc harvest packs documents into windows with a separator (EOS or SEP) between two of them
    and stores no row of a special token unless asked to. So a run ends
    - where `sequence` changes (another window);
    - where `position` does not step by 1 inside a window: rows were left out between, and
      inside a window's text only special tokens are left out, the separator among them;
    - after a stored `separator` token (stores with special tokens), except in the first
      `prefix` positions of a window and before its last `suffix` rows: the tokens put before
      and after every window (GPT-2's BOS is its EOS, BERT's closing SEP its separator).
    """
    n = len(sequence)
    if n == 0:
        return np.zeros(0, np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = sequence[1:] != sequence[:-1]
    new[1:] |= np.diff(position) != 1
    if tokens is not None and len(separator):
        after = np.flatnonzero(np.isin(tokens[:-1], np.asarray(separator)) & (position[:-1] >= prefix)) + 1
        if suffix and len(after):
            ends = np.append(sequence_starts(sequence)[1:], n)
            end = ends[np.searchsorted(ends, after, side="right")]  # the first row past the row's window
            after = after[end - after > suffix]
        new[after] = True
    return np.flatnonzero(new)


def read_windows(store: ActivationStore, model, stats: DashboardStats, examples: Examples, device) -> Examples:
    """Fill examples.values: each example's latent on every row of its window (pass 3).

    Rows are encoded exactly as in pass 1 (same latents, same steps), so a window
    holds the very numbers the top-k saw, whatever the grouping of examples.
    """
    lengths = examples.stop - examples.start
    width = int(lengths.max()) if len(examples) else 0
    values = np.zeros((len(examples), width), dtype=np.float32)
    if len(examples):
        order = np.argsort(examples.start, kind="stable")
        starts = examples.start[order]
        first, last = examples.start // store.chunk_rows, (examples.stop - 1) // store.chunk_rows
        blocks = np.unique(np.concatenate([np.minimum(first + d, last) for d in range(int((last - first).max()) + 1)]))

        def overlapping(s0, s1):
            a, b = np.searchsorted(starts, [s0 - width + 1, s1])
            candidates = order[a:b]
            return candidates[examples.stop[candidates] > s0]

        encoder = LatentEncoder(model, stats.latents, device)
        for s0, f in encode_blocks(store, encoder, blocks, lambda s0, s1: len(overlapping(s0, s1)) > 0):
            s1 = s0 + f.shape[0]
            hit = overlapping(s0, s1)
            a, b = np.maximum(examples.start[hit], s0), np.minimum(examples.stop[hit], s1)
            which = np.repeat(hit, b - a)
            rows = np.arange(len(which)) - np.repeat(np.cumsum(b - a) - (b - a), b - a) + np.repeat(a, b - a)
            got = f[torch.from_numpy(rows - s0).to(device), torch.from_numpy(examples.position[which]).to(device)]
            values[which, rows - examples.start[which]] = got.cpu().numpy()
    examples.values = values
    return examples


def state_path(output: Path) -> Path:
    return Path(output) / ".xc-export-state.safetensors"
