"""Generate from a model difference (logit diff amplification) or with crosscoder latents steered.

Amplification (Goodfire, 2025): both models read the same prefix and the next token is drawn from

    logits = logits_after + alpha * (logits_after - logits_before) = (1 + alpha) * after - alpha * before

computed in the second form, so that alpha = 0 is exactly the after-model and alpha = -1 exactly the
before-model. Each model keeps its own KV cache: one decoding step is two incremental forward passes.

Steering: forward hooks on one model add `S * d_I / input_scale` (latent I's decoder row, raw units) at
the sites of that model's sources, or with a clamp hold latent I at V by adding `(V - f_I) * d_I / scale`
where f_I is the crosscoder's encoding of the current activations.

Rows are (value, prompt, sample) triples, where the value is an alpha, a scale or a clamp; rows are
batched with left padding (mixed values in one batch are fine) and each stops at its own EOS.
Sampling draws token t of a row by inverse CDF from one uniform number of a stream seeded by
(seed, prompt index, sample index) only: the same stream for every value (common random numbers)
and for any batch size or order.
"""

import inspect
import math
import re
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from xcli import console
from xcli.devices import resolve_device
from xcli.errors import BadInput
from xcli.files import read_utf8, utf8_stdin
from xcli.lm.config import SITES, AmplifyConfig, ModelSpec, Sampling, SteerConfig  # noqa: F401 (read here by callers)
from xcli.lm.models import (
    check_same_tokenizer,
    context_limit,
    fast_dtype,
    load_causal_lm,
    load_tokenizer,
    sources_of_model,
    text_config,
)
from xcli.lm.sites import hook_site, resolve_site

Z95 = 1.959963984540054  # standard normal quantile at 0.975


# -- tokenizers and prompts -------------------------------------------------------------------------


def eos_ids(*models, tokenizer) -> list[int]:
    """Every EOS id the models' generation configs name, plus the tokenizer's."""
    ids = set()
    for model in models:
        value = getattr(model.generation_config, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else (value or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def read_prompts(path: str) -> list[str]:
    """One prompt per line ('-' for stdin); blank lines are skipped."""
    if path == "-":
        try:
            text = utf8_stdin().read()
        except UnicodeDecodeError as e:
            raise BadInput(f"--prompts - (stdin) is not UTF-8 text (byte {e.start}); convert it first") from None
    else:
        if not Path(path).is_file():
            raise BadInput(f"--prompts {path!r} does not exist (give a text file with one prompt per line, or -)")
        text = read_utf8(path, "--prompts")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise BadInput(f"--prompts {path!r} holds no prompts (one per line; blank lines are skipped)")
    return prompts


# -- sampling --------------------------------------------------------------------------------------

def row_uniforms(seed: int, prompt_index: int, sample: int, n: int) -> Tensor:
    """The random stream of one completion: n uniforms in [0, 1), float64."""
    state = np.random.SeedSequence([seed, prompt_index, sample]).generate_state(2, np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return torch.rand(n, dtype=torch.float64, generator=g)


def choose_tokens(logits: Tensor, temperature: float, top_p: float, u: Tensor) -> Tensor:
    """Next token per row from logits (B, V): argmax if temperature is 0, else inverse-CDF sampling.

    Tokens are ordered by probability (stable sort, so ties keep id order); top-p keeps each token
    whose preceding mass is below top_p, i.e. the smallest prefix whose mass reaches top_p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    kept = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    cdf = kept.cumsum(-1)
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    pos = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last_kept = (kept > 0).sum(-1) - 1  # rounding can put target at the very end
    pos = torch.minimum(pos, last_kept)
    return order.gather(-1, pos.unsqueeze(-1)).squeeze(-1)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (no continuity correction)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def describe_count(record: dict) -> str:
    """One human line for a count summary record."""
    key = next(k for k in ("alpha", "scale", "clamp") if k in record)
    low, high = record["ci95"]
    return (f"xc: count /{record['count']}/ {key}={record[key]:g}: {record['matches']}/{record['n']} = "
            f"{record['rate']:.1%} (95% CI {low:.1%}-{high:.1%})")


# -- the decoding loop -------------------------------------------------------------------------------

class Row(NamedTuple):
    value: float
    prompt_index: int
    sample: int


def _forward_kwargs(model) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _cache_argument(model) -> str:
    """The KV cache's name in forward and in its output: `cache` from transformers 5.x (where
    `past_key_values` is deprecated, and removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Runner:
    """Runs one model incrementally over a batch with its own KV cache."""

    def __init__(self, model):
        self.model, self.extra, self.cache_name = model, _forward_kwargs(model), _cache_argument(model)
        self.cache = None

    def reset(self):
        self.cache = None

    def __call__(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self.cache_name: self.cache}, **self.extra)
        self.cache = getattr(out, self.cache_name)
        return out.logits[:, -1].float()  # (B, V)


def _encode_prompts(tokenizer, prompts, max_new_tokens, models) -> list[list[int]]:
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    limit = min([c for c in map(context_limit, models) if c] or [0]) or None
    for i, ids in enumerate(encoded):
        if not ids:
            raise BadInput(f"prompt {i} ({prompts[i]!r}) is empty after tokenisation and the tokenizer adds no BOS")
        if limit and len(ids) + max_new_tokens > limit:
            raise BadInput(f"prompt {i} has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it exceeds "
                           f"the model's context of {limit} tokens")
    return encoded


def decode_rows(rows: list[Row], prompt_ids: list[list[int]], sampling: Sampling, step, start, device,
                eos: list[int], pad_id: int) -> list[tuple[list[int], str]]:
    """Generate every row of one batch. `start(values)` resets caches; `step(ids, mask, pos)` -> logits."""
    B, width = len(rows), max(len(prompt_ids[r.prompt_index]) for r in rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for b, r in enumerate(rows):  # left padding: every prompt ends at the last column
        p = prompt_ids[r.prompt_index]
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    uniforms = torch.stack([row_uniforms(sampling.seed, r.prompt_index, r.sample, sampling.max_new_tokens)
                            for r in rows])
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    start(torch.tensor([r.value for r in rows], dtype=torch.float32, device=device))

    logits = step(ids, mask, positions)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    generated = []
    for t in range(sampling.max_new_tokens):
        tokens = choose_tokens(logits, sampling.temperature, sampling.top_p, uniforms[:, t])
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        generated.append(tokens)
        finished |= torch.isin(tokens, eos_t)
        if bool(finished.all()) or t == sampling.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        logits = step(tokens.unsqueeze(1), mask, positions)

    out = []
    eos_set = set(eos)
    for b, seq in enumerate(torch.stack(generated, dim=1).tolist()):
        stop = next((i for i, tok in enumerate(seq) if tok in eos_set), None)
        out.append((seq[: stop + 1] if stop is not None else seq, "eos" if stop is not None else "length"))
    return out


def _run(rows_by_value, prompts, prompt_ids, sampling, step, start, device, eos, pad_id, tokenizer,
         value_key, count, token_ids, extra) -> Iterator[dict]:
    """Batch the rows, decode, yield one dict per completion, then one count summary per value."""
    pattern = re.compile(count) if count is not None else None
    matches: dict[float, list[int]] = {}
    rows = [r for value_rows in rows_by_value for r in value_rows]
    bar = console.progress(total=len(rows), desc="generating", unit="completion")
    try:
        for i in range(0, len(rows), sampling.batch_size):
            batch = rows[i: i + sampling.batch_size]
            with torch.no_grad():
                results = decode_rows(batch, prompt_ids, sampling, step, start, device, eos, pad_id)
            for row, (seq, finish) in zip(batch, results):
                text = tokenizer.decode([t for t in seq if t not in eos], skip_special_tokens=True)
                record = {"kind": "completion", "prompt": prompts[row.prompt_index], "completion": text,
                          value_key: row.value, "sample": row.sample, "seed": sampling.seed,
                          "prompt_index": row.prompt_index, "n_tokens": len(seq), "finish": finish, **extra}
                if token_ids:
                    record["token_ids"] = seq
                if pattern is not None:
                    record["match"] = bool(pattern.search(text))
                    matches.setdefault(row.value, []).append(int(record["match"]))
                yield record
            bar.update(len(batch))
    finally:
        bar.close()
    if pattern is not None:
        for value_rows in rows_by_value:
            value = value_rows[0].value
            k, n = sum(matches[value]), len(matches[value])
            low, high = wilson_interval(k, n)
            yield {"kind": "count", "count": count, value_key: value, "matches": k, "n": n,
                   "rate": k / n, "ci95": [low, high], **extra}


def _rows(values, n_prompts, n_samples) -> list[list[Row]]:
    return [[Row(float(v), p, s) for p in range(n_prompts) for s in range(n_samples)] for v in values]


def _warn_greedy(sampling: Sampling):
    if sampling.temperature == 0 and sampling.n_samples > 1:
        console.warn(f"--temperature 0 is greedy: all {sampling.n_samples} samples of a prompt will be identical")


# -- amplification ---------------------------------------------------------------------------------

def amplify(cfg: AmplifyConfig) -> Iterator[dict]:
    """Load both models offline, check they share a tokenizer, then run `amplify_models`."""
    device = resolve_device(cfg.device)
    dtype = fast_dtype(cfg.dtype, device)
    before_spec = ModelSpec.parse(cfg.before, allow_alias=False)
    after_spec = ModelSpec.parse(cfg.after, allow_alias=False)
    tokenizer = load_tokenizer(after_spec)
    try:
        check_same_tokenizer(load_tokenizer(before_spec), tokenizer, f"--before {cfg.before!r}",
                             f"--after {cfg.after!r}")
    except BadInput as e:  # no sound map between two vocabularies' next-token logits (xc-amplify(1))
        raise BadInput(f"{e}: amplification subtracts the two models' logits token by token; models with "
                       f"different tokenizers (a crosscoder of xc harvest --align) can each be steered with "
                       f"its own tokenizer instead (--model, --checkpoint, --latent)") from None
    before = load_causal_lm(before_spec, device, dtype)
    after = load_causal_lm(after_spec, device, dtype)
    yield from amplify_models(before, after, tokenizer, cfg)


def amplify_models(before, after, tokenizer, cfg: AmplifyConfig) -> Iterator[dict]:
    """Yield one dict per completion (alpha-major, then prompt, then sample), then count summaries.

    `before` and `after` are loaded causal LMs on one device; cfg.before/after/device/dtype are not used.
    """
    _warn_greedy(cfg.sampling)
    prompt_ids = _encode_prompts(tokenizer, cfg.prompts, cfg.sampling.max_new_tokens, [before, after])
    run_before, run_after = _Runner(before), _Runner(after)
    alpha = {}

    def start(values):
        run_before.reset(), run_after.reset()
        alpha["row"] = values.unsqueeze(1)

    def step(ids, mask, positions):
        a, b = run_after(ids, mask, positions), run_before(ids, mask, positions)
        width = min(a.shape[-1], b.shape[-1])  # embedding tables may be padded past the vocabulary
        return (1 + alpha["row"]) * a[:, :width] - alpha["row"] * b[:, :width]

    yield from _run(_rows(cfg.alphas, len(cfg.prompts), cfg.sampling.n_samples), cfg.prompts, prompt_ids,
                    cfg.sampling, step, start, after.device, eos_ids(before, after, tokenizer=tokenizer),
                    _pad_id(tokenizer), tokenizer, "alpha", cfg.count, cfg.token_ids, {})


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


# -- steering ----------------------------------------------------------------------------------------


class Steering:
    """Forward hooks that add latent directions (scale) or hold latents at a value (clamp).

    `values` (B,) holds the scale or clamp value of each row and is set before each batch.
    """

    def __init__(self, model, crosscoder, sources, latents: list[int], mode: str):
        self.model, self.crosscoder, self.latents, self.mode = model, crosscoder, list(latents), mode
        self.values: Tensor | None = None
        names = {s.name for s in sources}
        self.write = [s for s in sources if s.name in crosscoder.write]
        self.read = [s for s in sources if s.name in crosscoder.read]
        if not self.write:
            raise BadInput(f"the checkpoint writes no source of this model (its sources here: "
                           f"{', '.join(sorted(names))}); nothing to steer")
        if mode == "clamp":
            others = [n for n in crosscoder.read if n not in names]
            if others:
                raise BadInput(f"--clamp must encode the current activations, but the checkpoint also reads "
                               f"{', '.join(others)} from another model; use --scale")
        self.sites = {s.name: resolve_site(model, s.site, s.layer) for s in sources}
        self.directions = {}  # source -> (n_latents_steered, d) in raw units
        for s in self.write:
            rows = crosscoder.decoder_weight(s.name)[self.latents].detach().float()
            self.directions[s.name] = rows / crosscoder.scale(s.name).float()
        self._handles, self._seen, self._f = [], {}, None

    def __enter__(self):
        self._handles.append(self.model.register_forward_pre_hook(self._reset))
        for name, site in self.sites.items():
            self._handles.append(hook_site(site, lambda hidden, name=name: self.edit(name, hidden)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _reset(self, module, args):
        self._seen, self._f = {}, None

    def edit(self, name: str, hidden: Tensor) -> Tensor:
        """The activation at source `name` (B, T, d) after steering."""
        if name in self.crosscoder.read:
            self._seen[name] = hidden
        if name not in self.directions:
            return hidden
        direction = self.directions[name].to(hidden.device)  # (L, d)
        if self.mode == "scale":
            delta = self.values[:, None, None] * direction.sum(0)  # (B, 1, d)
        else:
            f = self._latents()[..., self.latents]  # (B, T, L)
            delta = (self.values[:, None, None] - f) @ direction  # (B, T, d)
        return hidden + delta.to(hidden.dtype)

    def _latents(self) -> Tensor:
        if self._f is None:
            missing = [n for n in self.crosscoder.read if n not in self._seen]
            if missing:
                raise BadInput(f"--clamp needs every read source before the first written one, but "
                               f"{', '.join(missing)} comes later in the forward pass; use --scale")
            x = {n: v.float() for n, v in self._seen.items()}
            self._f = self.crosscoder.encode(x, batch_select=False)
        return self._f


def steer(cfg: SteerConfig) -> Iterator[dict]:
    """Load the checkpoint and the model offline, check they belong together, then run `steer_model`."""
    from xcli.crosscoder.model import load as load_checkpoint

    device = resolve_device(cfg.device)
    dtype = fast_dtype(cfg.dtype, device)
    spec = ModelSpec.parse(cfg.model)
    crosscoder = load_checkpoint(cfg.checkpoint, device)
    check_latents(crosscoder, cfg.latents)
    sources = sources_of_model(crosscoder, spec, cfg.model)
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, device, dtype)
    yield from steer_model(model, tokenizer, crosscoder, sources, cfg)


def check_latents(crosscoder, latents) -> None:
    bad = [i for i in latents if not 0 <= i < crosscoder.n_latents]
    if bad:
        raise BadInput(f"--latent {bad[0]} is out of range; the checkpoint has {crosscoder.n_latents} latents "
                       f"(0-{crosscoder.n_latents - 1})")


def steer_model(model, tokenizer, crosscoder, sources, cfg: SteerConfig) -> Iterator[dict]:
    """Yield one dict per completion (value-major, then prompt, then sample), then count summaries.

    `sources` are the crosscoder's sources that live in `model` (see `sources_of_model`).
    """
    check_latents(crosscoder, cfg.latents)
    width = getattr(text_config(model), "hidden_size", None)
    for s in sources:
        if s.site in SITES and width and width != s.d:
            raise BadInput(f"source {s.name} has width {s.d} but the model's residual stream has {width}; "
                           f"the checkpoint was not trained on this model")
    _warn_greedy(cfg.sampling)
    prompt_ids = _encode_prompts(tokenizer, cfg.prompts, cfg.sampling.max_new_tokens, [model])
    steering = Steering(model, crosscoder, sources, list(cfg.latents), cfg.mode)
    runner = _Runner(model)

    def start(values):
        runner.reset()
        steering.values = values

    values = cfg.scales or cfg.clamps
    with steering:
        yield from _run(_rows(values, len(cfg.prompts), cfg.sampling.n_samples), cfg.prompts, prompt_ids,
                        cfg.sampling, runner, start, model.device, eos_ids(model, tokenizer=tokenizer),
                        _pad_id(tokenizer), tokenizer, cfg.mode, cfg.count, cfg.token_ids,
                        {"latents": list(cfg.latents)})
