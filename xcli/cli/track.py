"""`xc track`: follow named features across releases in a registry (SQLite or PostgreSQL)."""

import sys

import click

from xcli import console, strict_json
from xcli.cli.params import build, common_options, config_options
from xcli.files import read_path_argument
from xcli.track.config import TrackAddConfig, TrackNameConfig, TrackShowConfig


@click.group("track", epilog="""\b
  xc track add reg.db xc_v1_v2.safetensors --store acts_v1_v2.zarr
  xc track add reg.db xc_v2_v3.safetensors --store acts_v1_v2.zarr --store acts_v2_v3.zarr
  xc track name reg.db refusal-1 --release v2 --latent 1234
  xc track show reg.db refusal-1 --plot refusal.png
  xc track show reg.db --status gone | jq -c '{feature, release, class}'""")
@common_options
def command():
    """Follow features across model releases: stable ids, statuses, a watchlist.

    Successive crosscoders (release 1 and 2, then 2 and 3, ...) or one crosscoder
    over several releases enter a registry with `add`; the latents of each are
    matched with the features of the previous one through the release both read
    (decoder cosine, plus activation agreement on a common store), so that a
    feature keeps its id. Per release a feature is present, weakened, strengthened,
    new or gone, with its relative decoder norm, depth and top examples. `name`
    puts a feature on the watchlist; `add` exits 3 when a watched feature is gone,
    weakened or changed class. `show` prints the registry as JSON lines.
    """


def _echo_json(row: dict) -> None:
    sys.stdout.write(strict_json.dumps(row) + "\n")


@command.command("add")
@config_options(TrackAddConfig)
@common_options
def add(**options):
    """Add a crosscoder over successive releases; exit 3 on a watch alert.

    The crosscoder's first release must be the registry's newest (or the registry
    empty, then it is created with the schema of xc-registry(5)). Adding a
    checkpoint that is already there (same bytes) adds nothing. Prints one JSON line:
    the releases, the count of each status in the new releases, how many latents
    matched, and the alerts. Each alert is also one line on stderr, and the exit
    status is 3: a watched feature is gone or weakened in a new release, or its class
    kind (shared, mixed, exclusive) changed.
    """
    from xcli.files import output_lock
    from xcli.track.chain import WatchAlert, add_crosscoder
    from xcli.track.registry import sqlite_path

    options["checkpoint"] = read_path_argument(options["checkpoint"])
    config = build(TrackAddConfig, options)
    path = sqlite_path(config.registry)
    if path is not None:
        with output_lock(path):
            result = add_crosscoder(config)
    else:
        result = add_crosscoder(config)
    _echo_json(result.summary())
    sys.stdout.flush()
    if result.added:
        console.info(f"added {result.checkpoint}: releases {', '.join(result.releases)}; "
                     f"{result.matched} latents continue features of the previous crosscoder")
    else:
        console.info(f"{result.checkpoint} is already in the registry: nothing added")
    if result.alerts:  # one line each, on stderr, then exit 3
        for line in result.alerts[:-1]:
            console.error(line)
        raise WatchAlert(result.alerts[-1])


@command.command("name")
@config_options(TrackNameConfig)
@common_options
def name(**options):
    """Name a feature and watch it (or --unwatch a name).

    A feature is given by its id, or by a latent of a crosscoder over a release
    (--release with --latent). Naming is idempotent. Prints the watchlist row as
    one JSON line.
    """
    from xcli.track.chain import name_feature

    _echo_json(name_feature(build(TrackNameConfig, options)))


@command.command("show")
@config_options(TrackShowConfig)
@click.option("--plot", "plot_path", metavar="FILE.png", help="Also draw the features' decoder norm across "
              "releases into FILE.png. Needs matplotlib: pip install 'xcli[plot]'.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --plot file.")
@common_options
def show(plot_path, overwrite, **options):
    """The registry as JSON lines: one per feature and release.

    Each row: feature (the stable id), names (on the watchlist), release,
    position, status, class, norm (the feature's decoder norm in the release),
    rel_norm (over the release before), first_release, latent and crosscoder,
    match_confidence (how its latent was matched to the feature), and where
    recorded peak_layer and layer_share, frequency, top_examples.
    """
    from xcli.track.chain import plot_strength
    from xcli.track.chain import show as rows_of

    config = build(TrackShowConfig, options)
    if plot_path:
        from xcli.analysis.plots import require_matplotlib
        from xcli.files import atomic_path, check_output

        require_matplotlib()
        check_output(plot_path, overwrite=overwrite)
    rows = list(rows_of(config))
    for row in rows:
        _echo_json(row)
    sys.stdout.flush()
    if plot_path:
        if not rows:
            console.warn("no rows: no plot drawn")
            return
        with atomic_path(plot_path, overwrite=overwrite) as tmp:
            plot_strength(rows, tmp)
        console.info(f"wrote {plot_path}")
