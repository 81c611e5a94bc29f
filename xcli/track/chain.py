"""Follow features across releases: add crosscoders to a registry, name features, query them.

A crosscoder over releases (R_0, ..., R_k) enters the registry after the one that ended in
R_0 (an N-model crosscoder over several releases at once is the case k > 1; the common
pair of successive releases is k = 1). Per latent i and release m, with norm_m = ||d_m||,
the L2 norm of i's decoder rows over the sources of R_m (normalised units, as in
xc classify), and e = exclusive_share, LOW, HIGH = shared_band:

  alive_m    norm_m / max_m' norm_m' > (1 - e) / e; for two releases this is "not
             exclusive to the other one" in xc classify's sense (r < e)
  r_m        norm_m / (norm_{m-1} + norm_m): the relative decoder norm of R_m over R_{m-1}
  status_m   present       alive in R_m and R_{m-1} (or R_0 of the first crosscoder), and
                           LOW <= r_m <= HIGH
             weakened      alive in both, r_m < LOW
             strengthened  alive in both, r_m > HIGH
             new           alive in R_m, not in R_{m-1}; or alive in R_0 but matched to no
                           feature of the previous crosscoder
             gone          alive in R_{m-1}, not in R_m; or a feature of the previous
                           crosscoder alive in R_0 that no latent of this one matches
             (no row)      absent from both
  dead       a latent with no decoder norm, or (with a store) that never fires: not tracked

Latents of the new crosscoder alive in R_0 are matched with the features of the previous
crosscoder alive there (xcli.track.match); a match continues the feature, with the same id.

Watch alerts: after an add, each watched feature whose newest status is gone or weakened,
or whose class kind (shared, mixed, exclusive, as xc classify gives it) differs from the
one in the release before, gives one line: which feature, which release and why.
"""

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xcli import remote, strict_json
from xcli.analysis.classify import DEAD_NORM, classify, model_groups
from xcli.analysis.config import ClassifyConfig
from xcli.crosscoder.model import Crosscoder, load
from xcli.data.store import open_store
from xcli.devices import resolve_device
from xcli.errors import BadInput, XcError
from xcli.track.config import TrackAddConfig, TrackNameConfig, TrackShowConfig
from xcli.track.match import encode_stores, match
from xcli.track.registry import Registry, loads, now, open_registry

ALERT_STATUSES = ("gone", "weakened")


class WatchAlert(XcError):
    """A watched feature disappeared, weakened or changed class (exit 3)."""

    exit_code = 3


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _num(x):
    x = float(x)
    return None if not math.isfinite(x) else float(f"{x:.7g}")


# -- one crosscoder's view of its releases --------------------------------------------------------

@dataclass
class Profile:
    """Per latent and release of one crosscoder: norms, statuses, classes, depth."""

    releases: list[str]
    norm: np.ndarray  # (F, M)
    rel_norm: np.ndarray  # (F, M); NaN in the first release
    alive: np.ndarray  # (F, M) bool
    status: list[list[str | None]]  # [F][M]
    classes: list[str]
    dead: np.ndarray  # (F,) bool
    layer_share: list[dict | None] = field(default_factory=list)  # per release: (F, L) shares and layers

    def peak(self, m: int, latent: int):
        info = self.layer_share[m]
        if info is None or not np.all(np.isfinite(info["share"][latent])):
            return None, None
        shares = info["share"][latent]
        return info["layers"][int(shares.argmax())], {str(l): _num(s) for l, s in zip(info["layers"], shares)}


def statuses(norm: np.ndarray, exclusive_share: float, shared_band: tuple[float, float]):
    """alive (F, M), r (F, M) and the status of each latent in each release (module docstring)."""
    norm = np.asarray(norm, dtype=np.float64)
    top = norm.max(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        alive = (top > DEAD_NORM) & (norm / np.where(top > 0, top, 1) > (1 - exclusive_share) / exclusive_share)
        r = np.full_like(norm, np.nan)
        r[:, 1:] = norm[:, 1:] / (norm[:, :-1] + norm[:, 1:])
    low, high = shared_band
    out = []
    for i in range(len(norm)):
        row = []
        for m in range(norm.shape[1]):
            before = m > 0 and alive[i, m - 1]
            if not alive[i, m]:
                row.append("gone" if before else None)
            elif m == 0:
                row.append("present")
            elif not before:
                row.append("new")
            else:
                row.append("weakened" if r[i, m] < low else "strengthened" if r[i, m] > high else "present")
        out.append(row)
    return alive, r, out


def profile(model: Crosscoder, releases: list[str], config: TrackAddConfig, frequency=None) -> Profile:
    groups = {g.model: g for g in model_groups(model)}
    pair = tuple(releases) if len(releases) == 2 and len(groups) == 2 else None
    result = classify(model, None, ClassifyConfig(models=pair, exclusive_share=config.exclusive_share,
                                                  shared_band=config.shared_band))
    index = [result.models.index(r) for r in releases]
    norm = result.norm[:, index]
    alive, r, status = statuses(norm, config.exclusive_share, config.shared_band)
    dead = norm.max(1) < DEAD_NORM
    classes = list(result.classes)
    if frequency is not None:
        dead |= frequency <= 0
        classes = ["dead" if d else c for c, d in zip(classes, dead)]
    by_name = {s.name: s for s in model.sources}
    layer_share = []
    for release in releases:
        g = groups[release]
        layers = [by_name[model.write[c]].layer for c in g.columns]
        if None in layers or len(set(layers)) < 2:
            layer_share.append(None)
            continue
        distinct = sorted(set(layers))
        per_layer = np.stack([np.sqrt((result.source_norm[:, [c for c, l in zip(g.columns, layers) if l == layer]] ** 2)
                                      .sum(1)) for layer in distinct], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            layer_share.append({"layers": distinct, "share": per_layer / per_layer.sum(1, keepdims=True)})
    return Profile(list(releases), norm, r, alive, status, classes, dead, layer_share)


def class_kind(name: str | None) -> str | None:
    return None if name is None else name.split(":")[0]


# -- adding a crosscoder ---------------------------------------------------------------------------

@dataclass
class AddResult:
    checkpoint: str
    releases: list[str]
    added: bool
    counts: dict = field(default_factory=dict)
    matched: int = 0
    eligible: tuple[int, int] = (0, 0)
    alerts: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"checkpoint": self.checkpoint, "releases": self.releases, "added": self.added}
        if self.added:
            out.update({"statuses": self.counts, "matched": self.matched,
                        "eligible_before": self.eligible[0], "eligible_after": self.eligible[1]})
        out["alerts"] = self.alerts
        return out


def ordered_releases(model: Crosscoder, given) -> list[str]:
    names = [g.model for g in model_groups(model)]
    releases = list(given) if given else names
    for r in releases:
        if r not in names:
            raise BadInput(f"--releases names {r!r}, which writes no decoder in the checkpoint; models are: "
                           f"{', '.join(names)}")
    if len(releases) < 2:
        raise BadInput(f"the checkpoint has {len(names)} model(s) ({', '.join(names)}); tracking needs a "
                       "crosscoder over two or more releases")
    return releases


def _state(registry: Registry):
    releases = registry.rows("SELECT id, name, position FROM releases ORDER BY position")
    return releases


def previous_crosscoder(registry: Registry, release: str):
    """(id, path, sha256) of the crosscoder whose last release is `release` (the newest such)."""
    for cc_id, path, sha, names in registry.rows("SELECT id, path, sha256, releases FROM crosscoders ORDER BY id DESC"):
        names = loads(names, [])
        if names and names[-1] == release:
            return cc_id, path, sha
    return None


def add_crosscoder(config: TrackAddConfig) -> AddResult:
    """Add `config.checkpoint` to the registry (created if missing); see the module docstring."""
    checkpoint = str(Path(config.checkpoint).resolve())
    model = load(config.checkpoint)  # first: a missing or bad checkpoint is one line
    sha = file_sha256(config.checkpoint)
    releases = ordered_releases(model, config.releases)
    with open_registry(config.registry, create=True) as registry:
        known = registry.one("SELECT releases FROM crosscoders WHERE sha256 = ?", (sha,))
        if known is not None:
            return AddResult(checkpoint, loads(known, []), added=False)
        state = _state(registry)
        previous = None
        if state:
            newest = state[-1][1]
            if releases[0] != newest:
                raise BadInput(f"the checkpoint's first release is {releases[0]!r}, but the registry's newest is "
                               f"{newest!r}; add a crosscoder over ({newest}, ...), or give --releases in order")
            taken = {name for _, name, _ in state}
            clash = [r for r in releases[1:] if r in taken]
            if clash:
                raise BadInput(f"release {clash[0]!r} is already in the registry; a crosscoder adds releases after "
                               f"the newest one ({newest!r})")
            previous = previous_crosscoder(registry, newest)
            if previous is None:
                raise XcError(f"registry {registry.url!r}: no crosscoder ends in its newest release {newest!r}")

        device = resolve_device(config.device)
        stores = [open_store(s) for s in config.stores]
        before_model, matching, passes = None, None, None
        if previous is not None:
            before_path = previous[1]
            if not Path(before_path).is_file() or file_sha256(before_path) != previous[2]:
                raise BadInput(f"the previous crosscoder {before_path!r} is missing or changed since it was added; "
                               "put it back (matching goes through it)")
            before_model = load(before_path)
        if stores and before_model is None:  # else the matching makes the pass
            passes = encode_stores([model], stores, config.max_tokens, config.top_examples, config.batch_rows, device)
        after = profile(model, releases, config)
        if before_model is not None:
            rows = registry.rows(
                "SELECT l.latent, l.feature FROM latents l JOIN observations o ON o.feature = l.feature "
                "JOIN releases r ON r.id = o.release WHERE l.crosscoder = ? AND r.name = ? AND o.status <> 'gone'",
                (previous[0], releases[0]))
            feature_of = {int(lat): int(feat) for lat, feat in rows}
            eligible_after = [i for i in range(model.n_latents) if after.alive[i, 0] and not after.dead[i]]
            matching = match(before_model, model, releases[0], sorted(feature_of), eligible_after, stores,
                             config.min_confidence, config.max_tokens, config.top_examples, config.batch_rows, device)
            if matching.passes is not None:
                passes = [matching.passes[1]]
        if passes is not None:
            after = profile(model, releases, config, frequency=passes[-1].frequency)
        tokens = _token_arrays(stores)
        with registry.transaction():
            if registry.one("SELECT COUNT(*) FROM crosscoders WHERE sha256 = ?", (sha,)) or _state(registry) != state:
                raise BadInput(f"registry {registry.url!r} changed while this crosscoder was being matched; run again")
            result = _write(registry, model, checkpoint, sha, releases, state, previous, after, matching,
                            passes[-1] if passes else None, tokens, config)
            result.alerts = watch_alerts(registry, releases[1:])
    return result


def _token_arrays(stores):
    for s in stores:
        arrays = s.token_arrays()
        if arrays is not None:
            return arrays
    return None


def _examples(store_pass, latent: int, tokens) -> list[dict] | None:
    if store_pass is None:
        return None
    out = []
    for row, value in zip(store_pass.top_rows[latent], store_pass.top_values[latent]):
        if row < 0:
            continue
        example = {"row": int(row), "activation": _num(value)}
        if tokens is not None:
            example.update({k: int(tokens[k][row]) for k in ("tokens", "sequence", "position")})
            example["token"] = example.pop("tokens")
        out.append(example)
    return out


def _observe(registry, feature: int, release_id: int, cc_id: int, latent, status: str, prof: Profile, m: int,
             store_pass, tokens) -> None:
    if latent is None:
        values = (None, None, None, None, None, None, None)
    else:
        peak, shares = prof.peak(m, latent)
        values = (prof.classes[latent], _num(prof.norm[latent, m]), _num(prof.rel_norm[latent, m]), peak,
                  strict_json.dumps(shares) if shares else None,
                  None if store_pass is None else _num(store_pass.frequency[latent]),
                  strict_json.dumps(_examples(store_pass, latent, tokens)) if store_pass is not None else None)
    registry.execute("INSERT INTO observations (feature, release, crosscoder, latent, status, class, norm, rel_norm, "
                     "peak_layer, layer_share, frequency, top_examples) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                     "ON CONFLICT DO NOTHING", (feature, release_id, cc_id, latent, status, *values))


def _write(registry: Registry, model, checkpoint, sha, releases, state, previous, prof: Profile, matching,
           store_pass, tokens, config: TrackAddConfig) -> AddResult:
    position = state[-1][2] if state else 0
    ids = {name: rid for rid, name, _ in state}
    for name in releases:
        if name not in ids:
            position += 1
            ids[name] = registry.insert("INSERT INTO releases (name, position, added) VALUES (?, ?, ?)",
                                        (name, position, now()))
    settings = {"min_confidence": config.min_confidence, "exclusive_share": config.exclusive_share,
                "shared_band": list(config.shared_band), "stores": [remote.resolved(s) for s in config.stores],
                "max_tokens": config.max_tokens}
    cc_id = registry.insert("INSERT INTO crosscoders (path, sha256, releases, n_latents, settings, added) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (checkpoint, sha, strict_json.dumps(releases), model.n_latents,
                                                          strict_json.dumps(settings), now()))
    counts: dict[str, int] = {}
    continued: dict[int, int] = {}  # latent of this crosscoder -> feature it continues
    if matching is not None:
        rows = registry.rows("SELECT latent, feature FROM latents WHERE crosscoder = ?", (previous[0],))
        feature_of = {int(lat): int(feat) for lat, feat in rows}
        for i, j in matching.pairs:
            continued[j] = feature_of[i]
            agreement = None if matching.agreement is None else _num(matching.agreement[i, j])
            registry.execute("INSERT INTO matches (release, crosscoder_before, latent_before, crosscoder_after, "
                             "latent_after, feature, decoder_cosine, activation_agreement, confidence) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (ids[releases[0]], previous[0], i, cc_id, j, feature_of[i],
                              _num(matching.decoder_cosine[i, j]), agreement, _num(matching.confidence[i, j])))
        matched_before = {i for i, _ in matching.pairs}
        for i in matching.eligible_before:  # features alive in R_0 that no latent continues
            if int(i) not in matched_before:
                _observe(registry, feature_of[int(i)], ids[releases[1]], cc_id, None, "gone", prof, 1, None, None)
                counts["gone"] = counts.get("gone", 0) + 1
    for latent in range(model.n_latents):
        if prof.dead[latent] or not any(prof.status[latent]):
            continue
        status = list(prof.status[latent])
        feature = continued.get(latent)
        if feature is None:
            if previous is not None and status[0] == "present":
                status[0] = "new"  # alive in R_0 but continuing no feature of the previous crosscoder
            first = next(m for m, s in enumerate(status) if s is not None)
            feature = registry.insert("INSERT INTO features (first_release, crosscoder, latent) VALUES (?, ?, ?)",
                                      (ids[releases[first]], cc_id, latent))
        registry.execute("INSERT INTO latents (crosscoder, latent, feature) VALUES (?, ?, ?)", (cc_id, latent, feature))
        for m, s in enumerate(status):
            if s is None or (m == 0 and latent in continued):  # R_0 was recorded with the previous crosscoder
                continue
            _observe(registry, feature, ids[releases[m]], cc_id, latent, s, prof, m, store_pass, tokens)
            if m > 0 or previous is None or s == "new":
                counts[s] = counts.get(s, 0) + 1
    eligible = (len(matching.eligible_before), len(matching.eligible_after)) if matching is not None else (0, 0)
    return AddResult(checkpoint, releases, True, dict(sorted(counts.items())),
                     len(matching.pairs) if matching is not None else 0, eligible)


def watch_alerts(registry: Registry, releases: list[str]) -> list[str]:
    """One line per watched feature that is gone, weakened or changed class kind in one of `releases`."""
    alerts = []
    watched = registry.rows("SELECT name, feature FROM watchlist ORDER BY name")
    for name, feature in watched:
        history = registry.rows("SELECT r.name, o.status, o.class FROM observations o JOIN releases r "
                                "ON r.id = o.release WHERE o.feature = ? ORDER BY r.position", (feature,))
        for k, (release, status, cls) in enumerate(history):
            if release not in releases:
                continue
            if status in ALERT_STATUSES:
                why = {"gone": "is gone", "weakened": "weakened"}[status]
                alerts.append(f"watched feature {name!r} (id {feature}) {why} in release {release!r}")
            elif k and cls and history[k - 1][2] and class_kind(cls) != class_kind(history[k - 1][2]):
                alerts.append(f"watched feature {name!r} (id {feature}) changed class in release {release!r}: "
                              f"{history[k - 1][2]} in {history[k - 1][0]!r}, {cls} now")
    return alerts


# -- names and queries -----------------------------------------------------------------------------

def name_feature(config: TrackNameConfig) -> dict:
    """Put a feature on the watchlist under a name (or take the name off); the row as JSON."""
    with open_registry(config.registry) as registry, registry.transaction():
        if config.unwatch:
            feature = registry.one("SELECT feature FROM watchlist WHERE name = ?", (config.name,))
            if feature is None:
                raise BadInput(f"no watched feature is named {config.name!r}")
            registry.execute("DELETE FROM watchlist WHERE name = ?", (config.name,))
            return {"name": config.name, "feature": int(feature), "watched": False}
        if config.feature is not None:
            if registry.one("SELECT COUNT(*) FROM features WHERE id = ?", (config.feature,)) == 0:
                raise BadInput(f"--feature {config.feature}: no such feature in the registry")
            feature = config.feature
        else:
            if registry.one("SELECT COUNT(*) FROM releases WHERE name = ?", (config.release,)) == 0:
                names = [r[0] for r in registry.rows("SELECT name FROM releases ORDER BY position")]
                raise BadInput(f"--release {config.release!r} is not in the registry; releases: {', '.join(names)}")
            found = registry.rows("SELECT DISTINCT o.feature, c.path FROM observations o JOIN releases r ON r.id = "
                                  "o.release JOIN crosscoders c ON c.id = o.crosscoder WHERE r.name = ? AND o.latent = ?"
                                  " ORDER BY o.feature", (config.release, config.latent))
            if not found:
                raise BadInput(f"no tracked feature is latent {config.latent} in release {config.release!r}")
            if len({f for f, _ in found}) > 1:
                raise BadInput(f"latent {config.latent} in release {config.release!r} is a different feature in each "
                               "crosscoder over it: " + ", ".join(f"feature {f} ({p})" for f, p in found)
                               + "; give --feature ID")
            feature = int(found[0][0])
        current = registry.one("SELECT feature FROM watchlist WHERE name = ?", (config.name,))
        if current is not None and int(current) != feature:
            raise BadInput(f"name {config.name!r} already names feature {current}; --unwatch it first")
        if current is None:
            registry.execute("INSERT INTO watchlist (name, feature, added) VALUES (?, ?, ?)",
                             (config.name, feature, now()))
        return {"name": config.name, "feature": feature, "watched": True}


def resolve_features(registry: Registry, given) -> list[int] | None:
    if not given:
        return None
    out = []
    for text in given:
        if str(text).isdigit():
            if registry.one("SELECT COUNT(*) FROM features WHERE id = ?", (int(text),)) == 0:
                raise BadInput(f"feature {text}: no such feature in the registry")
            out.append(int(text))
        else:
            feature = registry.one("SELECT feature FROM watchlist WHERE name = ?", (text,))
            if feature is None:
                raise BadInput(f"{text!r} is neither a feature id nor a watched name")
            out.append(int(feature))
    return out


def show(config: TrackShowConfig):
    """Rows of the registry: one per feature and release, oldest release first (JSON-ready dicts)."""
    with open_registry(config.registry) as registry:
        features = resolve_features(registry, config.features)
        if config.release is not None and registry.one("SELECT COUNT(*) FROM releases WHERE name = ?",
                                                       (config.release,)) == 0:
            raise BadInput(f"--release {config.release!r} is not in the registry")
        where, params = ["1 = 1"], []
        if features is not None:
            where.append(f"o.feature IN ({', '.join('?' * len(features))})")
            params += features
        if config.release is not None:
            where.append("r.name = ?")
            params.append(config.release)
        if config.status is not None:
            where.append("o.status = ?")
            params.append(config.status)
        if config.watched:
            where.append("o.feature IN (SELECT feature FROM watchlist)")
        rows = registry.rows(
            "SELECT o.feature, r.name, r.position, o.status, o.class, o.norm, o.rel_norm, o.peak_layer, o.layer_share, "
            "o.frequency, o.latent, c.path, m.confidence, o.top_examples, fr.name FROM observations o "
            "JOIN releases r ON r.id = o.release JOIN crosscoders c ON c.id = o.crosscoder "
            "JOIN features f ON f.id = o.feature JOIN releases fr ON fr.id = f.first_release "
            "LEFT JOIN matches m ON m.crosscoder_after = o.crosscoder AND m.latent_after = o.latent "
            f"WHERE {' AND '.join(where)} ORDER BY o.feature, r.position", params)
        names: dict[int, list[str]] = {}
        for name, feature in registry.rows("SELECT name, feature FROM watchlist ORDER BY name"):
            names.setdefault(int(feature), []).append(name)
    for (feature, release, position, status, cls, norm, rel_norm, peak, shares, freq, latent, path, confidence,
         examples, first) in rows:
        row = {"feature": int(feature), "names": names.get(int(feature), []), "release": release,
               "position": int(position), "status": status, "class": cls, "norm": norm, "rel_norm": rel_norm,
               "first_release": first, "latent": latent, "crosscoder": path, "match_confidence": confidence}
        if peak is not None:
            row["peak_layer"], row["layer_share"] = peak, loads(shares)
        if freq is not None:
            row["frequency"] = freq
        if examples is not None:
            row["top_examples"] = loads(examples, [])
        yield row


def plot_strength(rows: list[dict], path) -> None:
    """A feature's decoder norm (normalised units) per release, one line per feature, statuses marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    releases = sorted({(r["position"], r["release"]) for r in rows})
    x_of = {name: k for k, (_, name) in enumerate(releases)}
    by_feature: dict[int, list[dict]] = {}
    for r in rows:
        by_feature.setdefault(r["feature"], []).append(r)
    for feature, items in sorted(by_feature.items()):
        label = ", ".join(items[0]["names"]) or f"feature {feature}"
        xs = [x_of[r["release"]] for r in items]
        ys = [r["norm"] if r["norm"] is not None else 0.0 for r in items]
        line, = ax.plot(xs, ys, marker="o", label=label)
        for x, y, r in zip(xs, ys, items):
            ax.annotate(r["status"], (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7,
                        color=line.get_color())
    ax.set_xticks(range(len(releases)), [name for _, name in releases])
    ax.set_xlabel("release")
    ax.set_ylabel("decoder norm in the release (normalised units)")
    ax.set_title("xc track: feature strength across releases")
    if len(by_feature) <= 12:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


