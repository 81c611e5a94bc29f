"""Latent partitions: designated shared latents and dedicated (model-exclusive) latents.

A crosscoder's latents may be split into blocks, in this order:

- **tied** (`xc train --shared-latents N`, the first N latents): each latent has one decoder
  direction shared by every model. Decoder rows of corresponding sources (same site, layer and
  width) in different models are tied: after each backward their gradients are summed (the
  gradient of one shared parameter) and after each optimizer step the rows are set to their
  mean, which keeps them exactly equal (Adam sees equal gradients, so the mean changes nothing
  but rounding). This is how the open implementation of Anthropic's designated shared features
  ties them (oli-clive-griffin/model-diffing). With --arch relu their L1 penalty is multiplied
  by `shared_penalty` (Anthropic: about 0.1-0.2).
- **dedicated** (`--exclusive MODEL=N`, repeatable; the next blocks, in the order given): the
  latent's decoder rows for every other model's sources are structurally zero (dedicated-feature
  crosscoders, Jiralerspong & Bricken 2026). They are zero from the start, their gradients are
  zeroed after each backward, and they are set to zero again after each optimizer step. Only the
  decoder is constrained: the encoder reads every source, as in the DFC paper's definition.
- **free**: the rest, as in a plain crosscoder.

The partition is part of the checkpoint's metadata (`partition`, man/xc-checkpoint.5) and
`check` validates it against the checkpoint's sources when one is opened.
"""

import itertools
from dataclasses import dataclass

import torch

from xcli.errors import BadInput
from xcli.source import Source


@dataclass(frozen=True)
class Block:
    model: str
    start: int
    stop: int


@dataclass(frozen=True)
class Partition:
    tied: tuple[int, int] | None = None
    """[start, stop) of the designated shared latents, or None."""
    shared_penalty: float = 1.0
    """relu: the tied latents' L1 penalty relative to the others'."""
    dedicated: tuple[Block, ...] = ()
    """Blocks of latents whose decoders write only their model's sources."""

    # -- building and describing ------------------------------------------------------------
    @classmethod
    def layout(cls, shared: int, exclusive: dict[str, int], shared_penalty: float = 1.0) -> "Partition":
        """The shared block first, then one dedicated block per model in the order given."""
        blocks, start = [], shared
        for model, count in exclusive.items():
            blocks.append(Block(model, start, start + count))
            start += count
        return cls((0, shared) if shared else None, shared_penalty, tuple(blocks))

    @property
    def size(self) -> int:
        """Latents in the tied and dedicated blocks."""
        return (self.tied[1] - self.tied[0] if self.tied else 0) + sum(b.stop - b.start for b in self.dedicated)

    def to_json(self) -> dict:
        return {"tied": None if self.tied is None else {"start": self.tied[0], "stop": self.tied[1],
                                                        "penalty": self.shared_penalty},
                "dedicated": [{"model": b.model, "start": b.start, "stop": b.stop} for b in self.dedicated]}

    @classmethod
    def from_json(cls, data, where: str) -> "Partition":
        """Read the metadata's record (shapes only; `check` validates it against the crosscoder)."""
        def whole(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not isinstance(data, dict) or set(data) - {"tied", "dedicated"}:
            raise BadInput(f"{where}: partition {data!r:.60} is not an object with tied and dedicated")
        tied, penalty = data.get("tied"), 1.0
        if tied is not None:
            if not (isinstance(tied, dict) and whole(tied.get("start")) and whole(tied.get("stop"))):
                raise BadInput(f"{where}: partition.tied {tied!r:.60} is not null or {{start, stop, penalty}}")
            penalty = tied.get("penalty", 1.0)
            if not (isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and 0 < penalty <= 1):
                raise BadInput(f"{where}: partition.tied.penalty {penalty!r:.40} is not a number in (0, 1]")
            tied = (tied["start"], tied["stop"])
        listed = data.get("dedicated", [])
        if not isinstance(listed, list):
            raise BadInput(f"{where}: partition.dedicated {listed!r:.60} is not a list of blocks")
        blocks = []
        for b in listed:
            if not (isinstance(b, dict) and isinstance(b.get("model"), str) and whole(b.get("start"))
                    and whole(b.get("stop"))):
                raise BadInput(f"{where}: partition.dedicated block {b!r:.60} is not {{model, start, stop}}")
            blocks.append(Block(b["model"], b["start"], b["stop"]))
        return cls(tied, float(penalty), tuple(blocks))

    def check(self, sources: list[Source], write: list[str], n_latents: int, where: str) -> None:
        """Ranges inside [0, n_latents), not empty and not overlapping; models that write a source;
        tied blocks need every model to have the same written sites, layers and widths."""
        models = write_models(sources, write)
        ranges = ([("tied", *self.tied)] if self.tied else []) + [(f"dedicated:{b.model}", b.start, b.stop)
                                                                    for b in self.dedicated]
        for label, start, stop in ranges:
            if not 0 <= start < stop <= n_latents:
                raise BadInput(f"{where}: partition block {label} [{start}, {stop}) is not a non-empty range "
                               f"of latents 0 to {n_latents}")
        ranges.sort(key=lambda r: r[1])
        for (a, _, stop), (b, start, _) in itertools.pairwise(ranges):
            if start < stop:
                raise BadInput(f"{where}: partition blocks {a} and {b} overlap")
        if ranges and len(models) < 2:
            raise BadInput(f"{where}: a latent partition needs sources of two or more models; "
                           f"the written sources are all of model {next(iter(models))!r}")
        for b in self.dedicated:
            if b.model not in models:
                raise BadInput(f"{where}: partition block dedicated:{b.model} names a model that writes no "
                               f"source; models are: {', '.join(models)}")
        if len({b.model for b in self.dedicated}) != len(self.dedicated):
            raise BadInput(f"{where}: partition lists a model's dedicated block twice")
        if self.tied:
            tie_groups(sources, write, where)

    # -- what training applies -------------------------------------------------------------------
    def penalty_weights(self, n_latents: int, device=None) -> torch.Tensor:
        """(F,) factor of each latent's L1 penalty: shared_penalty on the tied block, 1 elsewhere."""
        w = torch.ones(n_latents, device=device)
        if self.tied:
            w[self.tied[0]:self.tied[1]] = self.shared_penalty
        return w

    @torch.no_grad()
    def fix_gradients(self, model) -> None:
        """After backward: tied rows get the sum of their copies' gradients; zeroed rows get none."""
        decoders = list(model.W_dec)
        if self.tied:
            rows = slice(*self.tied)
            for group in tie_groups(model.sources, model.write):
                grads = [decoders[i].grad for i in group]
                if any(g is None for g in grads):
                    continue
                total = sum(g[rows] for g in grads)
                for g in grads:
                    g[rows] = total
        for i, block in self.zeroed(model):
            grad = decoders[i].grad
            if grad is not None:
                grad[block.start:block.stop] = 0

    @torch.no_grad()
    def enforce(self, model) -> None:
        """After init and each optimizer step: tied rows equal (their mean), other models' rows zero."""
        decoders = list(model.W_dec)
        if self.tied:
            rows = slice(*self.tied)
            for group in tie_groups(model.sources, model.write):
                mean = sum(decoders[i][rows] for i in group) / len(group)
                for i in group:
                    decoders[i][rows] = mean
        for i, block in self.zeroed(model):
            decoders[i][block.start:block.stop] = 0

    @torch.no_grad()
    def check_weights(self, model, where: str) -> None:
        """A checkpoint keeps what training enforced: dedicated rows zero for other models, tied rows equal."""
        decoders = list(model.W_dec)
        for i, block in self.zeroed(model):
            if bool(decoders[i][block.start:block.stop].any()):
                raise BadInput(f"{where}: decoder.{model.write[i]} is not zero on the latents "
                               f"[{block.start}, {block.stop}) dedicated to model {block.model}")
        if self.tied:
            rows = slice(*self.tied)
            for group in tie_groups(model.sources, model.write, where):
                if any(not torch.equal(decoders[group[0]][rows], decoders[i][rows]) for i in group[1:]):
                    raise BadInput(f"{where}: the tied latents [{self.tied[0]}, {self.tied[1]}) differ between "
                                   f"{', '.join(model.write[i] for i in group)}")

    def zeroed(self, model):
        """(index into model.write, block) for every decoder block held at zero."""
        by_name = {s.name: s for s in model.sources}
        for i, name in enumerate(model.write):
            for block in self.dedicated:
                if by_name[name].model != block.model:
                    yield i, block

    def latent_roles(self, n_latents: int) -> list[str | None]:
        """Per latent: "tied", "dedicated:MODEL" or None (free)."""
        roles: list[str | None] = [None] * n_latents
        if self.tied:
            roles[self.tied[0]:self.tied[1]] = ["tied"] * (self.tied[1] - self.tied[0])
        for b in self.dedicated:
            roles[b.start:b.stop] = [f"dedicated:{b.model}"] * (b.stop - b.start)
        return roles


def write_models(sources: list[Source], write: list[str]) -> list[str]:
    """Models of the written sources, in order of first appearance (as `xc classify` groups them)."""
    by_name = {s.name: s for s in sources}
    return list(dict.fromkeys(by_name[n].model for n in write))


def tie_groups(sources: list[Source], write: list[str], where: str = "--shared-latents") -> list[list[int]]:
    """Indices into `write` of the sources tied together: one per (site, layer), one from each model.
    Every model must write the same sites and layers with the same widths."""
    by_name = {s.name: s for s in sources}
    models = write_models(sources, write)
    keys: dict[str, dict[tuple, int]] = {m: {} for m in models}
    for i, name in enumerate(write):
        s = by_name[name]
        keys[s.model][(s.site, s.layer)] = i
    first = keys[models[0]]
    for m in models[1:]:
        if set(keys[m]) != set(first):
            missing = min(set(first) ^ set(keys[m]), key=str)
            raise BadInput(f"{where}: tied latents need every model to write the same sites and layers; "
                           f"site {missing[0]} layer {missing[1]} is written by {models[0]} or {m} but not both")
    groups = [[keys[m][key] for m in models] for key in first]
    for group in groups:
        widths = {by_name[write[i]].d for i in group}
        if len(widths) > 1:
            raise BadInput(f"{where}: tied latents need corresponding sources of equal width; "
                           f"{', '.join(write[i] for i in group)} have widths {sorted(widths)}")
    return groups
