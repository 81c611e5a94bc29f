"""The planted chain: the behaviour of v2 appears at v2 and is gone at v3, the grammar keeps its ids,
the watch alert fires, a rerun adds nothing; a retrained crosscoder matches the first one."""

import json
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from track_chain import SPEC, best_latents

from xcli.errors import BadInput
from xcli.track.chain import add_crosscoder, name_feature, show
from xcli.track.config import TrackAddConfig, TrackNameConfig, TrackShowConfig
from xcli.track.match import match

# Briefly trained crosscoders leave about a tenth of an exclusive latent's decoder norm on the side
# where its feature is absent (r ~ 0.1 to 0.13 here): a share of 0.8 calls that absent.
EXCLUSIVE = 0.8


def add(db, checkpoint, **options):
    return add_crosscoder(TrackAddConfig(str(db), str(checkpoint), exclusive_share=EXCLUSIVE, **options))


def xc(*args):
    return subprocess.run([sys.executable, "-m", "xcli", *map(str, args)], check=False, capture_output=True, text=True)


def feature_of(db, checkpoint, latent) -> int | None:
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT l.feature FROM latents l JOIN crosscoders c ON c.id = l.crosscoder "
                          "WHERE c.path = ? AND l.latent = ?", (str(checkpoint.resolve()), int(latent))).fetchone()
    return None if row is None else row[0]


def history(db, feature) -> dict[str, str]:
    return {r["release"]: r["status"] for r in show(TrackShowConfig(db, (str(feature),)))}


@pytest.fixture
def registry(chain, tmp_path):
    """The chain's first link in a fresh registry."""
    db = tmp_path / "reg.db"
    add(db, chain.crosscoders["v1v2"], stores=(str(chain.store),))
    return db


def recovered(chain, kinds: tuple[str, ...], threshold=0.95):
    """Planted features of these kinds that both crosscoders of the chain learnt (best decoder cosine)."""
    l12, c12 = best_latents(chain, chain.crosscoders["v1v2"], ("v1", "v2"))
    l23, c23 = best_latents(chain, chain.crosscoders["v2v3"], ("v2", "v3"))
    return [(g, l12[g], l23[g]) for g, kind in enumerate(chain.truth.kinds)
            if kind in kinds and c12[g] > threshold and c23[g] > threshold]


def test_planted_chain(chain, registry):
    db = registry
    habit = recovered(chain, ("exclusive:v2",))
    grammar = recovered(chain, ("shared",))
    assert len(habit) == 2 and len(grammar) >= 7, (habit, grammar)  # the crosscoders learnt the plant

    # Watch one habit feature and one grammar feature, named by a latent of the first crosscoder.
    g, latent12, _ = habit[0]
    assert name_feature(TrackNameConfig(str(db), "habit", release="v2", latent=int(latent12)))["watched"]
    _, grammar_latent, _ = grammar[0]
    name_feature(TrackNameConfig(str(db), "grammar", release="v1", latent=int(grammar_latent)))

    result = add(db, chain.crosscoders["v2v3"], stores=(str(chain.store),))
    assert result.added and result.releases == ["v2", "v3"]
    assert any("'habit'" in a and "gone in release 'v3'" in a for a in result.alerts), result.alerts
    assert not any("'grammar'" in a for a in result.alerts), result.alerts

    # The behaviour: new at v2, gone at v3, one id across both crosscoders.
    for g, a, b in habit:
        feature = feature_of(db, chain.crosscoders["v1v2"], a)
        assert feature is not None and feature_of(db, chain.crosscoders["v2v3"], b) == feature
        assert history(db, feature) == {"v2": "new", "v3": "gone"}, g
    # The grammar: present in all three releases with the same id.
    for g, a, b in grammar:
        feature = feature_of(db, chain.crosscoders["v1v2"], a)
        assert feature is not None and feature_of(db, chain.crosscoders["v2v3"], b) == feature, g
        assert history(db, feature) == {"v1": "present", "v2": "present", "v3": "present"}, g
    # v1's own features are gone at v2 and not followed further; v3's are new at v3.
    for g, a, _ in recovered(chain, ("exclusive:v1",), 0.0):
        if best_latents(chain, chain.crosscoders["v1v2"], ("v1", "v2"))[1][g] > 0.95:
            assert history(db, feature_of(db, chain.crosscoders["v1v2"], a)) == {"v1": "present", "v2": "gone"}
    for g, _, b in recovered(chain, ("exclusive:v3",), 0.0):
        if best_latents(chain, chain.crosscoders["v2v3"], ("v2", "v3"))[1][g] > 0.95:
            assert history(db, feature_of(db, chain.crosscoders["v2v3"], b)) == {"v3": "new"}

    # Rows carry the evidence: the top examples are rows where the planted direction is strong.
    rows = list(show(TrackShowConfig(str(db), ("habit",))))
    assert [r["names"] for r in rows] == [["habit"], ["habit"]]
    new = rows[0]
    assert new["class"] == "exclusive:v2" and new["rel_norm"] >= EXCLUSIVE and new["frequency"] > 0
    from xcli.data.store import open_store

    direction = chain.truth.decoders[chain.source("v2")][habit[0][0]]
    acts = open_store(chain.store).read(chain.source("v2"), 0, SPEC.tokens)
    along = acts @ direction / np.linalg.norm(direction)
    assert len(new["top_examples"]) == 5
    assert all(along[e["row"]] >= 0.5 for e in new["top_examples"]), [along[e["row"]] for e in new["top_examples"]]
    assert rows[1]["match_confidence"] >= 0.5

    # A rerun adds nothing.
    counts = {t: sqlite3.connect(db).execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
              for t in ("releases", "crosscoders", "features", "observations", "matches", "watchlist")}
    again = add(db, chain.crosscoders["v2v3"], stores=(str(chain.store),))
    assert not again.added and again.alerts == []
    assert counts == {t: sqlite3.connect(db).execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in counts}


def test_command_line_exit_status_and_json_lines(chain, registry, tmp_path):
    db = registry
    habit = recovered(chain, ("exclusive:v2",))
    named = xc("track", "name", db, "refusal-1", "--release", "v2", "--latent", habit[0][1])
    assert named.returncode == 0 and json.loads(named.stdout)["name"] == "refusal-1"
    run = xc("track", "add", db, chain.crosscoders["v2v3"], "--store", chain.store, "--exclusive-share", EXCLUSIVE)
    assert run.returncode == 3, run.stderr
    assert json.loads(run.stdout)["added"] is True
    alert = [line for line in run.stderr.splitlines() if "refusal-1" in line]
    assert len(alert) == 1 and "gone in release 'v3'" in alert[0]
    rerun = xc("track", "add", db, chain.crosscoders["v2v3"], "--store", chain.store, "--exclusive-share", EXCLUSIVE)
    assert rerun.returncode == 0 and json.loads(rerun.stdout)["added"] is False

    rows = [json.loads(line) for line in xc("track", "show", db, "refusal-1").stdout.splitlines()]
    assert [(r["release"], r["status"]) for r in rows] == [("v2", "new"), ("v3", "gone")]
    gone = [json.loads(line) for line in xc("track", "show", db, "--status", "gone", "--release", "v3").stdout.splitlines()]
    assert gone and all(r["status"] == "gone" and r["release"] == "v3" for r in gone)

    # Bad input: one line, exit 2.
    for args, words in [(("show", tmp_path / "missing.db"), "does not exist"),
                        (("add", db, chain.crosscoders["v2v3_seed1"]), "newest")]:
        bad = xc("track", *args)
        assert bad.returncode == 2 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    junk = tmp_path / "junk.db"
    junk.write_text("not a database" * 100)
    bad = xc("track", "show", junk)
    assert bad.returncode == 2 and "not an SQLite database" in bad.stderr


def test_a_crosscoder_out_of_order_or_moved_is_refused(chain, registry, tmp_path):
    with pytest.raises(Exception, match="newest"):
        add_crosscoder(TrackAddConfig(str(registry), str(chain.crosscoders["v2v3_seed1"]), releases=("v3", "v2")))
    with pytest.raises(BadInput, match="does not exist"):
        add_crosscoder(TrackAddConfig(str(registry), str(tmp_path / "missing.safetensors")))
    with pytest.raises(BadInput, match="not in the registry"):
        name_feature(TrackNameConfig(str(registry), "x", release="v9", latent=1))
    with pytest.raises(BadInput, match="say which feature"):
        TrackNameConfig(str(registry), "x")
    with pytest.raises(BadInput, match="neither a feature id"):
        list(show(TrackShowConfig(str(registry), ("nobody",))))
    moved = tmp_path / "fresh.db"
    copy = tmp_path / "v1v2.safetensors"
    shutil.copy(chain.crosscoders["v1v2"], copy)
    add_crosscoder(TrackAddConfig(str(moved), str(copy)))
    copy.unlink()
    with pytest.raises(Exception, match="missing or changed"):
        add_crosscoder(TrackAddConfig(str(moved), str(chain.crosscoders["v2v3"])))


def test_stores_at_an_s3_url_give_the_same_registry(chain, registry, s3, tmp_path):
    """xc track add --store s3://... (a real S3 API, tests/s3_server.py) records what the local store gives."""
    from click.testing import CliRunner

    from xcli import remote
    from xcli.cli import cli

    remote.filesystem("s3").put(str(chain.store), f"{s3['bucket']}/chain/acts.zarr", recursive=True)
    url = f"s3://{s3['bucket']}/chain/acts.zarr"
    db = tmp_path / "url.db"
    result = CliRunner().invoke(cli, ["track", "add", str(db), str(chain.crosscoders["v1v2"]), "--store", url,
                                      "--exclusive-share", str(EXCLUSIVE), *s3["option"]])
    assert result.exit_code == 0 and json.loads(result.stdout)["added"], result.stderr
    assert list(show(TrackShowConfig(str(db)))) == list(show(TrackShowConfig(str(registry))))
    with sqlite3.connect(db) as con:
        [settings] = [json.loads(s) for (s,) in con.execute("SELECT settings FROM crosscoders")]
    assert settings["stores"] == [url] and s3["endpoint"] not in json.dumps(settings)  # options are not recorded


def test_decoder_only_matching_keeps_the_grammar(chain, tmp_path):
    """Without a store, decoder cosine alone carries the grammar features across."""
    db = tmp_path / "reg.db"
    add(db, chain.crosscoders["v1v2"])
    add(db, chain.crosscoders["v2v3"])
    kept = [feature_of(db, chain.crosscoders["v1v2"], a) == feature_of(db, chain.crosscoders["v2v3"], b)
            for _, a, b in recovered(chain, ("shared",))]
    assert np.mean(kept) >= 0.9


def test_a_retrained_crosscoder_matches_the_live_latents(chain):
    """Same pair, another seed: most latents that fire find their counterpart."""
    from xcli.crosscoder.model import load
    from xcli.data.store import open_store
    from xcli.track.match import encode_stores

    a, b = load(chain.crosscoders["v2v3"]), load(chain.crosscoders["v2v3_seed1"])
    passes = encode_stores([a, b], [open_store(chain.store)], None, 0, 4096, "cpu")
    live_a, live_b = (np.flatnonzero(p.frequency > 0) for p in passes)
    m = match(a, b, "v2", live_a, live_b, [open_store(chain.store)])
    assert m.fraction_matched >= 0.8, m.fraction_matched
    # Matched pairs are near-identical directions.
    assert np.median([m.decoder_cosine[i, j] for i, j in m.pairs]) > 0.95


def test_one_crosscoder_over_three_releases(chain, tmp_path):
    """The other route: one latent is one feature in every release; statuses from the norms alone."""
    db = tmp_path / "reg.db"
    result = add(db, chain.crosscoders["v1v2v3"], stores=(str(chain.store),))
    assert result.added and result.releases == ["v1", "v2", "v3"]
    checkpoint = chain.crosscoders["v1v2v3"]
    learnt, cosine = best_latents(chain, checkpoint, ("v1", "v2", "v3"))
    expected = {"shared": {"v1": "present", "v2": "present", "v3": "present"},
                "exclusive:v1": {"v1": "present", "v2": "gone"},
                "exclusive:v2": {"v2": "new", "v3": "gone"},
                "exclusive:v3": {"v3": "new"}}
    checked = 0
    for g, kind in enumerate(chain.truth.kinds):
        if cosine[g] > 0.95:
            assert history(db, feature_of(db, checkpoint, learnt[g])) == expected[kind], (g, kind)
            checked += 1
    assert checked >= 12 and sum(cosine[g] > 0.95 for g, k in enumerate(chain.truth.kinds) if k == "exclusive:v2") == 2


def test_depth_is_recorded_per_release(tmp_path):
    """A cross-layer crosscoder: peak layer and layer shares of each release, from the decoder norms."""
    import torch

    from xcli.crosscoder.model import Crosscoder, save
    from xcli.source import Source

    sources = [Source(f"{r}.resid.{layer}", r, "resid", layer, 4) for r in ("v1", "v2") for layer in (3, 5)]
    model = Crosscoder(sources, n_latents=2, arch="relu")
    with torch.no_grad():
        for w, (n0, n1) in zip(model.W_dec, [(1.0, 0.0), (0.2, 0.0), (0.0, 3.0), (0.0, 4.0)]):
            w.zero_()
            w[0, 0], w[1, 1] = n0, n1  # latent 0: v1 at layer 3 (1.0, 0.2); latent 1: v2 at layers 3, 5 (3, 4)
    path = save(model, tmp_path / "deep.safetensors")
    add(tmp_path / "reg.db", path)
    rows = {(r["latent"], r["release"]): r for r in show(TrackShowConfig(str(tmp_path / "reg.db")))}
    assert rows[0, "v1"]["peak_layer"] == 3 and rows[0, "v1"]["layer_share"] == {"3": pytest.approx(1 / 1.2), "5": pytest.approx(0.2 / 1.2)}
    assert rows[0, "v2"]["status"] == "gone" and rows[1, "v2"]["status"] == "new"
    assert rows[1, "v2"]["peak_layer"] == 5 and rows[1, "v2"]["layer_share"]["5"] == pytest.approx(4 / 7)
