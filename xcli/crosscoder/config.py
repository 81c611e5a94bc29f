"""The architectures a crosscoder can have, and the checks of their options.

No torch here: `xc --help` lists these choices, and configs check them, without loading
the model code (xcli.crosscoder.model, xcli.crosscoder.fmx).
"""

from itertools import pairwise

from xcli.errors import BadInput

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
THRESHOLD_ARCHS = ("jumprelu",)
"""--arch values with a learned threshold per latent (xcli.crosscoder.jumprelu): no k."""

# JumpReLU training defaults: Anthropic's January 2025 update, as the crosscode trainer records them
# (oli-clive-griffin/model-diffing, crosscode/trainers/jan_update_crosscoder/config.py).
JUMPRELU_TANH_PENALTY = 20.0      # final λ_s; it rises linearly from 0 over the run
JUMPRELU_TANH_SCALE = 4.0         # c in tanh(c · f_i · ||d_i||)
JUMPRELU_PREACT_PENALTY = 3e-6    # λ_p
JUMPRELU_BANDWIDTH = 2.0          # ε of the straight-through estimator's rectangle kernel
JUMPRELU_LOG_THRESHOLD = 0.1      # log θ at the start ("they set log t to 0.1, not t"): θ = e^0.1
FMX_ARCHS = ("fmx", "fmx-topk", "fmx-relu")
"""--arch values of fmxcoders; `fmx` selects with BatchTopK, as the paper does."""
FACTORIZATIONS = ("tr", "cp")
DEFAULT_MASK_PROB = 0.05
SOURCE_PARALLEL_ARCHS = ("topk", "batchtopk")
"""--arch values that `xc train --split-sources` trains."""
MATRYOSHKA = "matryoshka"
"""The --arch of Matryoshka crosscoders (xcli.crosscoder.matryoshka): BatchTopK with nested prefixes."""


def is_fmx(arch: str) -> bool:
    return arch in FMX_ARCHS


def activation_of(arch: str) -> str:
    """The activation an --arch selects with: relu, topk or batchtopk."""
    return {"fmx": "batchtopk", "fmx-topk": "topk", "fmx-relu": "relu", MATRYOSHKA: "batchtopk"}.get(arch, arch)


def check_ranks(factorization: str, ranks) -> tuple[int, ...]:
    ranks = tuple(int(r) for r in ranks)
    want = 3 if factorization == "tr" else 1
    if len(ranks) not in ((1, 3) if factorization == "tr" else (1,)) or min(ranks) < 1:
        shape = "R (all three) or R1,R2,R3" if want == 3 else "one rank R"
        raise BadInput(f"--ranks {','.join(map(str, ranks))} does not fit --factorization {factorization}: "
                       f"give {shape}, positive whole numbers")
    return ranks * 3 if len(ranks) < want else ranks


def check_fmx_options(arch: str, factorization: str | None, ranks, mask_prob: float | None) -> None:
    """Validate the fmx options of a TrainConfig (before the stores are opened)."""
    if not is_fmx(arch) and (factorization is not None or ranks is not None):
        raise BadInput(f"--factorization and --ranks apply to --arch {', '.join(FMX_ARCHS)}; not to {arch}")
    if factorization is not None and factorization not in FACTORIZATIONS:
        raise BadInput(f"--factorization {factorization!r} is not known; use one of {', '.join(FACTORIZATIONS)}")
    if ranks is not None:
        check_ranks(factorization or "tr", ranks)
    if mask_prob is not None and not 0 <= mask_prob < 1:
        raise BadInput(f"--mask-prob {mask_prob} must be at least 0 and below 1")


# -- Matryoshka prefixes -------------------------------------------------------------------------

def check_prefix_widths(widths, latents: int | None = None, label: str = "--groups") -> tuple[int, ...]:
    """The nested prefix widths of a Matryoshka crosscoder: strictly increasing whole numbers from 1.

    With `latents`, the last may be below it (the whole dictionary is then added as the last
    prefix) but not above it; the result then ends at `latents`."""
    widths = tuple(widths)
    shown = ",".join(map(str, widths))
    if not widths or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        raise BadInput(f"{label} {shown!r} is not a list of prefix widths; give increasing whole numbers, e.g. "
                       f"128,512,2048")
    if widths[0] < 1 or any(b <= a for a, b in pairwise(widths)):
        raise BadInput(f"{label} {shown} must be strictly increasing prefix widths of at least 1 (e.g. 128,512,2048)")
    if latents is not None:
        if widths[-1] > latents:
            raise BadInput(f"{label} {shown} goes beyond the {latents} latents; the widths are nested prefixes "
                           f"of the dictionary, the widest at most {latents}")
        if widths[-1] < latents:
            widths += (latents,)
    return widths


def default_prefix_widths(latents: int) -> tuple[int, ...]:
    """F/16, F/4, F: three prefixes, each four times the one before (fewer when F is below 16)."""
    return tuple(sorted({w for w in (latents // 16, latents // 4, latents) if w >= 1}))
