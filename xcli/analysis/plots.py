"""Figures of a classification (`xc classify --plot DIR`), drawn with matplotlib.

matplotlib is the optional extra `[plot]`; it is imported only here, and the
object-oriented API (Figure, no pyplot) keeps the drawing free of global state.
"""

from pathlib import Path

import numpy as np

from xcli.analysis.classify import Classification
from xcli.errors import BadInput
from xcli.files import atomic_path, check_output, check_replaceable

NU_FRAME = (-0.5, 1.5)  # the range of nu shown; 0 = model-specific, 1 = shared
PLOT_FILES = ("relative_norm.png", "cosine_shared.png", "layer_profiles.png", "latent_scaling.png")
VERDICT_COLOURS = {"specific": "tab:blue", "shrinkage": "tab:orange", "decoupling": "tab:green",
                   "shrinkage+decoupling": "tab:red", "undetermined": "tab:gray"}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput("--plot needs matplotlib, which is not installed; run: pip install 'xcli[plot]'") from None


def check_plot_dir(directory, overwrite: bool, inputs=()) -> Path:
    """Refuse before any work if a figure would be overwritten; create DIR if its parent exists.

    With `overwrite`, only regular files that are none of the command's `inputs` are replaced."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BadInput(f"--plot {str(directory)!r} is a file, not a folder")
    if not directory.parent.exists():
        raise BadInput(f"--plot folder {str(directory)!r} cannot be created: {str(directory.parent)!r} does not exist")
    if directory.exists():
        for name in PLOT_FILES:
            check_output(directory / name, overwrite=overwrite)
            if overwrite:
                check_replaceable(directory / name, "file", inputs)
    return directory


def write_plots(result: Classification, directory, overwrite: bool = False, inputs=()) -> list[Path]:
    """Draw the figures that apply to this crosscoder; returns the files written."""
    require_matplotlib()
    directory = check_plot_dir(directory, overwrite, inputs)
    directory.mkdir(exist_ok=True)
    drawn = []
    for name, draw in (("relative_norm.png", relative_norm_histogram), ("cosine_shared.png", cosine_histogram),
                       ("layer_profiles.png", layer_heatmap), ("latent_scaling.png", scaling_scatter)):
        figure = draw(result)
        if figure is None:
            continue
        path = directory / name
        with atomic_path(path, overwrite=overwrite) as tmp:
            figure.savefig(tmp, format="png", dpi=120)
        drawn.append(path)
    return drawn


def _figure(width=7.0, height=4.2):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots()


def _log_counts(ax, highest: float) -> None:
    """A log count axis with plain numbers, where a bin holding one latent stays visible."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.set_ylim(0.7, highest * 1.6)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def relative_norm_histogram(result: Classification):
    """The trimodal figure of Lindsey et al.: r of every live latent, thresholds shaded."""
    if result.rel_norm is None:
        return None
    a, b = result.pair
    live = np.array([c != "dead" for c in result.classes]) & np.isfinite(result.rel_norm)
    if not live.any():
        return None
    figure, ax = _figure()
    cfg = result.config
    low, high = cfg.shared_band
    ax.axvspan(0, 1 - cfg.exclusive_share, color="tab:blue", alpha=0.12, label=f"exclusive:{a}")
    ax.axvspan(cfg.exclusive_share, 1, color="tab:red", alpha=0.12, label=f"exclusive:{b}")
    ax.axvspan(low, high, color="tab:green", alpha=0.10, label="shared")
    counts, *_ = ax.hist(result.rel_norm[live], bins=np.linspace(0, 1, 101), color="0.25")
    _log_counts(ax, counts.max())
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"relative decoder norm r = ||d_{b}|| / (||d_{a}|| + ||d_{b}||)")
    ax.set_ylabel("latents (log scale)")
    counts = {c: result.classes.count(c) for c in (f"exclusive:{a}", "shared", f"exclusive:{b}")}
    ax.set_title(f"{int(live.sum())} live latents: " + ", ".join(f"{n} {c}" for c, n in counts.items()))
    figure.legend(loc="outside lower center", ncol=3, fontsize="small", frameon=False)
    return figure


def cosine_histogram(result: Classification):
    """Decoder cosine of the shared latents between A and B."""
    if result.cosine is None:
        return None
    shared = np.array([c == "shared" for c in result.classes]) & np.isfinite(result.cosine)
    if not shared.any():
        return None
    figure, ax = _figure()
    counts, *_ = ax.hist(result.cosine[shared], bins=np.linspace(-1, 1, 101), color="tab:green")
    _log_counts(ax, counts.max())
    ax.set_xlim(-1, 1)
    a, b = result.pair
    ax.set_xlabel(f"cosine similarity of decoder vectors, {a} vs {b}")
    ax.set_ylabel("shared latents (log scale)")
    ax.set_title(f"{int(shared.sum())} shared latents, median cosine {np.median(result.cosine[shared]):.3f}")
    return figure


def layer_heatmap(result: Classification):
    """Norm profile over layers of every live latent, sorted by peak layer."""
    if result.layer_share is None:
        return None
    shares = result.layer_share
    live = np.all(np.isfinite(shares), axis=1) & np.array([c != "dead" for c in result.classes])
    shares = shares[live]
    if not len(shares):
        return None
    peak = shares.argmax(1)
    order = np.lexsort((-shares.max(1), peak))  # by peak layer; within it, layer-local latents first
    figure, ax = _figure(6.0, 6.5)
    image = ax.imshow(shares[order], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(result.layers)), [str(layer) for layer in result.layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{len(shares)} live latents, sorted by peak layer")
    ax.set_title("decoder norm profile over layers")
    figure.colorbar(image, ax=ax, label="share of the latent's decoder norm")
    return figure


def scaling_scatter(result: Classification):
    """Latent Scaling ratios of the exclusive latents, with the verdict thresholds."""
    if result.scaling is None:
        return None
    s = result.scaling
    exclusive = [i for i, c in enumerate(result.classes) if c.startswith("exclusive:")
                 and np.isfinite(s["nu_epsilon"][i]) and np.isfinite(s["nu_r"][i])]
    if not exclusive:
        return None
    figure, ax = _figure(6.0, 5.0)
    verdicts = [s["verdict"][i] for i in exclusive]
    for verdict, colour in VERDICT_COLOURS.items():
        idx = [i for i, v in zip(exclusive, verdicts) if v == verdict]
        if idx:  # ratios far outside [0, 1] are drawn on the frame's edge
            ax.scatter(np.clip(s["nu_r"][idx], *NU_FRAME), np.clip(s["nu_epsilon"][idx], *NU_FRAME), s=12,
                       color=colour, label=f"{verdict} ({len(idx)})")
    ax.set_xlim(NU_FRAME[0] - 0.05, NU_FRAME[1] + 0.05)
    ax.set_ylim(NU_FRAME[0] - 0.05, NU_FRAME[1] + 0.05)
    ax.axhline(result.config.nu_epsilon, color="0.4", linestyle="--", linewidth=1)
    ax.axvline(result.config.nu_r, color="0.4", linestyle="--", linewidth=1)
    ax.set_xlabel("nu_r (other model's reconstruction / owner's)")
    ax.set_ylabel("nu_epsilon (other model's error / owner's)")
    ax.set_title("Latent Scaling of exclusive latents")
    ax.legend(fontsize="small", loc="upper left")
    return figure
