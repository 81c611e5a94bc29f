"""The registry: versioned migrations on SQLite and PostgreSQL (the same code), statuses, correlations."""

import itertools
import json
import sqlite3

import numpy as np
import pytest

import neuronpedia_db as npdb
from xcli.errors import BadInput
from xcli.track import registry as reg
from xcli.track.chain import statuses
from xcli.track.match import Correlation, cosine_matrix

TABLES = {"schema_version", "releases", "crosscoders", "features", "latents", "observations", "matches", "watchlist"}


def test_migrations_apply_in_order_once(tmp_path):
    db = tmp_path / "reg.db"
    with reg.connect(str(db), create=True) as r:
        assert reg.migrate(r, upto=1) == [1]  # a registry of the first schema version
        assert r.version() == 1
    with reg.open_registry(str(db)) as r:  # opening brings it up to date, once
        assert r.version() == reg.SCHEMA_VERSION and TABLES <= r.tables()
        assert reg.migrate(r) == []
    with sqlite3.connect(db) as con:
        versions = [v for (v,) in con.execute("SELECT version FROM schema_version ORDER BY version")]
        indexes = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert versions == [m[0] for m in reg.MIGRATIONS] and "observations_by_release" in indexes


def test_registries_xc_cannot_read_are_refused(tmp_path):
    newer = tmp_path / "newer.db"
    with reg.open_registry(str(newer), create=True) as r:
        r.execute("INSERT INTO schema_version VALUES (99, 'future', 'x')")
    with pytest.raises(BadInput, match="newer than this xc"):
        reg.open_registry(str(newer))
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE t (x)")
    with pytest.raises(BadInput, match="not an xc track registry"):
        reg.open_registry(str(other))
    with pytest.raises(BadInput, match="does not exist"):
        reg.open_registry(str(tmp_path / "missing.db"))
    with pytest.raises(BadInput, match="unknown URL scheme"):
        reg.open_registry("mysql://x/y")
    assert reg.sqlite_path("sqlite:////abs/r.db").as_posix() == "/abs/r.db"
    assert reg.sqlite_path("sqlite:///rel/r.db").as_posix() == "rel/r.db"


def test_a_transaction_lands_whole_or_not_at_all(tmp_path):
    with reg.open_registry(str(tmp_path / "r.db"), create=True) as r:
        with pytest.raises(RuntimeError), r.transaction():
            r.insert("INSERT INTO releases (name, position, added) VALUES (?, ?, ?)", ("v1", 1, "t"))
            raise RuntimeError("stop")
        assert r.one("SELECT COUNT(*) FROM releases") == 0


@pytest.fixture(scope="module")
def postgres():
    if npdb.find_bin_dir() is None:
        pytest.skip(npdb.NOT_INSTALLED)
    pytest.importorskip("psycopg", reason="PostgreSQL registries need pip install 'xcli[postgres]'")
    server = npdb.PostgresServer.start()
    server.create_database("registry")
    yield f"postgresql://{server.USER}@/registry?host={server.dir}&port={server.PORT}"
    server.stop()


def test_the_same_code_runs_on_postgresql(postgres, chain):
    """The planted chain's first link, in PostgreSQL, read back with psql (the server's own client)."""
    from xcli.track.chain import add_crosscoder, name_feature, show
    from xcli.track.config import TrackAddConfig, TrackNameConfig, TrackShowConfig

    first = add_crosscoder(TrackAddConfig(postgres, str(chain.crosscoders["v1v2"]), stores=(str(chain.store),)))
    assert first.added
    assert not add_crosscoder(TrackAddConfig(postgres, str(chain.crosscoders["v1v2"]))).added
    with reg.open_registry(postgres) as r:
        assert r.version() == reg.SCHEMA_VERSION and TABLES <= r.tables()
        feature = r.one("SELECT MIN(feature) FROM observations WHERE status = 'present'")
    name_feature(TrackNameConfig(postgres, "grammar-1", feature=int(feature)))
    rows = list(show(TrackShowConfig(postgres, ("grammar-1",))))
    assert [r["release"] for r in rows] == ["v1", "v2"] and rows[0]["names"] == ["grammar-1"]
    second = add_crosscoder(TrackAddConfig(postgres, str(chain.crosscoders["v2v3"]), stores=(str(chain.store),)))
    assert second.added and second.matched > 0


def test_statuses_follow_the_documented_rules():
    e, band = 0.9, (0.3, 0.7)
    norm = np.array([[1.0, 1.0],    # equal: present, present
                     [1.0, 0.05],   # r = 0.048 <= 0.1: gone
                     [0.05, 1.0],   # new
                     [1.0, 0.3],    # r = 0.23: weakened
                     [0.3, 1.0],    # r = 0.77: strengthened
                     [0.0, 0.0]])   # dead: no rows
    alive, r, status = statuses(norm, e, band)
    assert status == [["present", "present"], ["present", "gone"], [None, "new"], ["present", "weakened"],
                      ["present", "strengthened"], [None, None]]
    assert np.isnan(r[:, 0]).all() and r[3, 1] == pytest.approx(0.3 / 1.3) and r[4, 1] == pytest.approx(1 / 1.3)
    assert alive[:5].sum(1).tolist() == [2, 1, 1, 2, 2] and not alive[5].any()
    # Two releases: absent exactly where xc classify calls the latent exclusive to the other (r >= e).
    from xcli.analysis.classify import relative_norm
    rng = np.random.default_rng(0)
    pairs = rng.uniform(0, 1, (2000, 2)) ** 3
    alive, _, _ = statuses(pairs, e, band)
    rn = relative_norm(pairs[:, 0], pairs[:, 1])
    assert np.array_equal(alive[:, 0], rn < e) and np.array_equal(alive[:, 1], rn > 1 - e)
    # Three releases: a feature that leaves and comes back is gone, then new.
    _, _, status = statuses(np.array([[1.0, 0.0, 1.0]]), e, band)
    assert status == [["present", "gone", "new"]]


def test_correlation_and_cosines_against_numpy():
    rng = np.random.default_rng(1)
    a = np.maximum(rng.standard_normal((300, 5)), 0)
    b = np.concatenate([a[:, :2] * 2 + 0.1 * rng.random((300, 2)), np.zeros((300, 1)), rng.random((300, 2))], 1)
    corr = Correlation(5, 5)
    for start in range(0, 300, 70):
        corr.add(a[start:start + 70], b[start:start + 70])
    with np.errstate(invalid="ignore", divide="ignore"):  # the constant column: NaN in numpy's
        expected = np.corrcoef(a.T, b.T)[:5, 5:]
    got = corr.result()
    live = np.isfinite(expected)
    assert np.allclose(got[live], expected[live]) and np.all(got[~live] == 0)  # a constant column: 0
    x, y = rng.standard_normal((4, 7)), rng.standard_normal((3, 7))
    brute = [[float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)) for v in y] for u in x]
    assert np.allclose(cosine_matrix(x, y), brute)


def test_show_filters_are_subsets(chain, tmp_path):
    from xcli.track.chain import add_crosscoder, show
    from xcli.track.config import TrackAddConfig, TrackShowConfig

    db = str(tmp_path / "r.db")
    add_crosscoder(TrackAddConfig(db, str(chain.crosscoders["v1v2"])))
    rows = list(show(TrackShowConfig(db)))
    for release, status in itertools.product(("v1", "v2"), ("present", "new", "gone")):
        some = list(show(TrackShowConfig(db, release=release, status=status)))
        assert some == [r for r in rows if r["release"] == release and r["status"] == status]
    assert json.dumps(rows)  # JSON-ready


def test_plot_draws_the_strength_across_releases(chain, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the [plot] extra")
    from xcli.track.chain import add_crosscoder, plot_strength, show
    from xcli.track.config import TrackAddConfig, TrackShowConfig

    db = str(tmp_path / "r.db")
    add_crosscoder(TrackAddConfig(db, str(chain.crosscoders["v1v2"])))
    rows = list(show(TrackShowConfig(db, ("1", "2"))))
    plot_strength(rows, tmp_path / "strength.png")
    assert (tmp_path / "strength.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
