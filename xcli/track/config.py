"""The options of `xc track`: one declaration each (xcli.options), no torch."""

from dataclasses import dataclass

from xcli import remote
from xcli.errors import BadInput
from xcli.lm.config import check_device, device_option
from xcli.options import count, name_list, option, pair

STATUSES = ("present", "weakened", "strengthened", "new", "gone")
"""What a feature is in a release (xcli.track.chain defines each)."""

REGISTRY_HELP = ("The registry: an SQLite file (created if missing; also sqlite:///PATH) or a PostgreSQL URL "
                 "(postgresql://USER@HOST/DB; needs pip install 'xcli[postgres]'). Schema in xc-registry(5).")


def registry_argument():
    return option(help=REGISTRY_HELP, argument=True, metavar="REGISTRY")


@dataclass(frozen=True)
class TrackAddConfig:
    registry: str = registry_argument()
    checkpoint: str = option(help="A crosscoder whose models are successive releases (the first one the "
                                  "registry's newest release, unless the registry is empty); - reads its path "
                                  "from stdin.", argument=True, metavar="CHECKPOINT|-")
    stores: tuple[str, ...] = option(
        (), "Activation store (a folder or a URL, e.g. s3://BUCKET/acts.zarr) holding the sources of this crosscoder and of the previous one, rows lined up "
            "(the same tokens): adds activation agreement to the matching, top examples and frequencies. "
            "Repeat for stores split by release.", flags=("--store",), metavar="STORE", multiple=True)
    releases: tuple[str, ...] | None = option(
        None, "The checkpoint's models in release order, oldest first. Default: checkpoint order.",
        metavar="OLD,NEW[,...]", parse=name_list)
    min_confidence: float = option(0.5, "A latent continues a feature of the previous crosscoder when its match "
                                        "confidence is at least this: the decoder cosine over the shared "
                                        "release's sources or, with --store, the mean of it and the activation "
                                        "correlation (each clipped at 0).")
    exclusive_share: float = option(0.9, "A feature is absent from a release whose decoder norm is below "
                                         "(1 - SHARE) / SHARE of its largest one (two releases: r >= SHARE or "
                                         "r <= 1 - SHARE, as in xc classify).")
    shared_band: tuple[float, float] = option(
        (0.3, 0.7), "Present (unchanged) when LOW <= r <= HIGH, with r = ||d_new|| / (||d_old|| + ||d_new||); "
                    "weakened below LOW, strengthened above HIGH.", metavar="LOW,HIGH",
        parse=pair(",", float, "LOW,HIGH (e.g. 0.3,0.7)"), cli_default="0.3,0.7")
    top_examples: int = option(5, "With --store: store rows kept per feature and release, strongest first.")
    max_tokens: int | None = option(None, "With --store: use only the first N rows.", metavar="N", parse=count)
    batch_rows: int = 4096
    """Rows encoded per batch in the store pass (Python callers only)."""
    device: str = device_option("the crosscoders encode the store")
    storage_options: tuple = remote.storage_options_option()

    def __post_init__(self):
        remote.configure(self.storage_options)  # before any store is opened
        object.__setattr__(self, "stores", tuple(self.stores))
        if self.releases is not None:
            object.__setattr__(self, "releases", tuple(self.releases))
            if len(set(self.releases)) != len(self.releases) or len(self.releases) < 2:
                raise BadInput(f"--releases {','.join(self.releases)!r} must name two or more different models")
        if not 0 < self.min_confidence <= 1:
            raise BadInput(f"--min-confidence {self.min_confidence} must be in (0, 1]")
        if not 0.5 < self.exclusive_share < 1:
            raise BadInput(f"--exclusive-share {self.exclusive_share} must be above 0.5 and below 1")
        low, high = self.shared_band
        if not 0 <= low <= 0.5 <= high <= 1:
            raise BadInput(f"--shared-band {low},{high} must be LOW,HIGH with 0 <= LOW <= 0.5 <= HIGH <= 1")
        if self.top_examples < 0:
            raise BadInput(f"--top-examples {self.top_examples} must be 0 or more")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise BadInput(f"--max-tokens {self.max_tokens} must be at least 1")
        if self.max_tokens is not None and not self.stores:
            raise BadInput("--max-tokens applies to the store pass; give --store STORE as well")
        check_device(self.device)


@dataclass(frozen=True)
class TrackNameConfig:
    registry: str = registry_argument()
    name: str = option(help="The feature's name, e.g. refusal-1: it goes on the watchlist.", argument=True,
                       metavar="NAME")
    feature: int | None = option(None, "The feature's id (as `xc track show` prints it).", metavar="ID")
    release: str | None = option(None, "With --latent: the release the latent is seen in.", metavar="RELEASE")
    latent: int | None = option(None, "With --release: a latent of a crosscoder over that release.", metavar="I")
    unwatch: bool = option(False, "Take NAME off the watchlist instead.")

    def __post_init__(self):
        if self.unwatch:
            if self.feature is not None or self.release is not None or self.latent is not None:
                raise BadInput("--unwatch takes NAME alone")
        elif self.feature is None and (self.release is None or self.latent is None):
            raise BadInput("say which feature: --feature ID, or --release RELEASE --latent I")
        elif self.feature is not None and (self.release is not None or self.latent is not None):
            raise BadInput("give --feature ID or --release with --latent, not both")


@dataclass(frozen=True)
class TrackShowConfig:
    registry: str = registry_argument()
    features: tuple[str, ...] = option((), "Feature ids or watchlist names; none: every feature.",
                                       argument=True, multiple=True, metavar="[FEATURE...]")
    release: str | None = option(None, "Only rows of this release.", metavar="RELEASE")
    status: str | None = option(None, "Only rows with this status.", choices=STATUSES)
    watched: bool = option(False, "Only features on the watchlist.")

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(self.features))
