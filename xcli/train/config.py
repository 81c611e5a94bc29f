"""The options of `xc train`: one declaration each (xcli.options), no torch."""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from xcli import remote
from xcli.crosscoder.config import (
    ARCHS,
    FACTORIZATIONS,
    FMX_ARCHS,
    JUMPRELU_BANDWIDTH,
    JUMPRELU_LOG_THRESHOLD,
    JUMPRELU_PREACT_PENALTY,
    JUMPRELU_TANH_PENALTY,
    JUMPRELU_TANH_SCALE,
    MATRYOSHKA,
    SOURCE_PARALLEL_ARCHS,
    activation_of,
    check_fmx_options,
    check_prefix_widths,
    is_fmx,
)
from xcli.errors import BadInput
from xcli.lm.config import check_device, device_option
from xcli.options import count, name_list, option, overwrite_option, whole_numbers

DTYPES = ("auto", "float32", "bfloat16")
DEFAULT_SHARED_PENALTY = 0.15  # Anthropic's designated shared features: lambda_s / lambda_f about 0.1-0.2


def model_count(text: str) -> str:
    """'MODEL=N' checked and written back as 'MODEL=N' (a string, so that it records as JSON unchanged)."""
    model, sep, n = text.partition("=")
    if not sep or not model.strip() or not n.strip().isdigit() or int(n) < 1:
        raise ValueError(f"{text!r} is not MODEL=N with N a whole number of latents >= 1 (e.g. tuned=64)")
    return f"{model.strip()}={int(n)}"


def exclusive_counts(exclusive) -> dict[str, int]:
    """('a=4', 'b=8') -> {'a': 4, 'b': 8}, in the order given."""
    counts: dict[str, int] = {}
    for text in exclusive:
        model, _, n = model_count(text).partition("=")
        if model in counts:
            raise BadInput(f"--exclusive names model {model!r} twice; give each model once")
        counts[model] = int(n)
    return counts
TRAIN_ARCHS = ARCHS + FMX_ARCHS + (MATRYOSHKA,)
# Fields that do not change the weights: a resumed run may differ in these.
RUN_CONTROL = ("stores", "output", "device", "log", "log_every", "checkpoint_every", "resume", "overwrite",
               "allow_incomplete", "split_sources", "storage_options")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `xc train` needs. None means "choose a default" (xcli.train.loop.resolve)."""

    stores: tuple[str, ...] = option(help="Activation stores whose rows line up (same tokens).", argument=True,
                                     multiple=True, metavar="STORE...")
    output: str = option(help="The checkpoint to write (.safetensors; format in xc-checkpoint(5)).",
                         flags=("-o", "--output"), metavar="FILE")
    sources: tuple[str, ...] | None = option(
        None, "Comma-separated sources to train on. Default: every source of the stores, or those --read and "
              "--write name.", metavar="NAMES", parse=name_list)
    read: tuple[str, ...] | None = option(None, "Comma-separated sources the encoder reads. Default: all "
                                                "training sources.", metavar="NAMES", parse=name_list)
    write: tuple[str, ...] | None = option(
        None, "Comma-separated sources the decoder reconstructs. Default: all training sources. Reading layer n "
              "and writing layer n+1 makes a transcoder.", metavar="NAMES", parse=name_list)
    arch: str = option(
        "batchtopk", "relu: L1 penalty weighted by decoder norms; topk: the k best latents per token; batchtopk: "
        "the k*B best per batch, with a learned threshold at inference; jumprelu: a learned threshold per latent "
        "(Anthropic's January 2025 recipe: tanh sparsity penalty and pre-activation loss; see --tanh-penalty, "
        "--tanh-scale, --preact-penalty, --bandwidth, --initial-threshold). fmx: a factorized masked crosscoder "
        "(fmxcoder) over layers of one model, selecting with batchtopk; fmx-topk and fmx-relu select with topk "
        "and relu. See --factorization, --ranks, --mask-prob. matryoshka: batchtopk whose nested prefixes of the "
        "dictionary (--groups) must each reconstruct the input (Bussmann et al. 2025); it encodes as batchtopk.",
        choices=TRAIN_ARCHS)
    latents: int | None = option(None, "Dictionary size F.")
    groups: tuple[int, ...] | None = option(
        None, "matryoshka: the nested prefix widths, strictly increasing, e.g. 128,512,2048: the first 128 "
              "latents must reconstruct the input alone, then the first 512, then all. The whole dictionary is "
              "always the last prefix (added when the list ends below F). The loss is the mean of the prefixes' "
              "reconstruction losses. Default: F/16,F/4,F.", metavar="W1,W2,...", parse=whole_numbers)
    expansion: float | None = option(None, "Dictionary size as a multiple of the widest source's width "
                                           "(default 16).")
    k: int | None = option(None, "Active latents per token, for topk and batchtopk (default 32).")
    l1: float | None = option(None, "Sparsity penalty lambda for relu (default 2.0); it warms up over the first "
                                    "5% of steps.")
    tanh_penalty: float | None = option(
        None, f"jumprelu: the sparsity coefficient lambda_s of lambda_s * sum_i tanh(c * f_i * sum_s ||W_dec,i^s||), "
              f"reached at the end of the run: it rises linearly from 0 over all steps (default "
              f"{JUMPRELU_TANH_PENALTY:g}, Anthropic's). Raise it for fewer active latents.")
    tanh_scale: float | None = option(None, f"jumprelu: c in the tanh sparsity penalty (default "
                                            f"{JUMPRELU_TANH_SCALE:g}, Anthropic's).")
    preact_penalty: float | None = option(
        None, f"jumprelu: lambda_p of the pre-activation loss lambda_p * sum_i relu(theta_i - h_i) * "
              f"sum_s ||W_dec,i^s||, which keeps latents from dying (default {JUMPRELU_PREACT_PENALTY:g}, "
              f"Anthropic's; 0 turns it off).")
    bandwidth: float | None = option(
        None, f"jumprelu: width of the rectangle kernel of the straight-through estimator that trains the "
              f"thresholds (default {JUMPRELU_BANDWIDTH:g}, Anthropic's).")
    initial_threshold: float | None = option(
        None, f"jumprelu: every latent's threshold theta at the start (default e^{JUMPRELU_LOG_THRESHOLD:g}, "
              f"about {math.exp(JUMPRELU_LOG_THRESHOLD):.3f}: Anthropic start log theta at "
              f"{JUMPRELU_LOG_THRESHOLD:g}).")
    batch_size: int = option(4096, "Tokens per step.", metavar="N", parse=count)
    tokens: int | None = option(None, "Training tokens, e.g. 50M (rounded up to whole batches; several epochs "
                                      "when it exceeds the store). Default: one pass over the training rows.",
                                metavar="N", parse=count)
    steps: int | None = option(None, "Training steps, instead of --tokens.")
    lr: float | None = option(None, "Peak Adam learning rate. Default: 2e-4 / sqrt(F / 16384).")
    warmup: int | None = option(None, "Steps of linear learning-rate warmup. Default: min(1000, 5% of steps).")
    decay: float = option(0.2, "Fraction of the steps, at the end, over which the learning rate falls linearly "
                               "to zero.")
    clip: float = option(1.0, "Maximum gradient norm (0: no clipping).")
    k_aux: int | None = option(None, "Dead latents used per token by the AuxK loss (topk, batchtopk). Default: "
                                     "half the summed width of the written sources, at most 512; 0 turns AuxK off.")
    dead_tokens: int | None = option(
        None, "A latent that has not fired for this many training tokens counts as dead (and AuxK trains it). "
              "Default: a tenth of the run's tokens, at most 10M.", metavar="N", parse=count)
    eval_fraction: float = option(0.01, "Fraction of the store's chunks held out to report FVU, L0 and dead "
                                        "latents on, and to calibrate the BatchTopK threshold on (at least one "
                                        "chunk when above 0; 0: no evaluation, the threshold calibrated on "
                                        "training rows). A store too small to spare a chunk is held out in "
                                        "blocks of down to 64 rows.")
    shuffle_buffer: int = option(65536, "Rows shuffled together in memory (whole chunks); memory use grows with "
                                        "it, not with the store.", metavar="N", parse=count)
    seed: int = option(0, "Seed of the initialisation and the data order.")
    device: str = device_option("training runs")
    dtype: str = option(
        "auto", "Compute dtype of the encoder matmul; weights and Adam state stay float32. auto: bfloat16 on "
        "CUDA GPUs with bf16 and on CPUs with AMX or AVX512-BF16, else float32. The choice is recorded, and "
        "--resume must use the same one.", choices=DTYPES)
    log: str | None = option(None, "Write metrics as JSON lines: loss parts, FVU per source, L0, dead fraction, "
                                   "lr, tokens/s; and held-out evaluations. Under torchrun, spell it --log-file "
                                   "(torchrun claims --log).", flags=("--log", "--log-file"), metavar="FILE")
    log_every: int = option(100, "Steps between metrics lines.")
    checkpoint_every: int = option(1000, "Steps between checkpoints (with evaluation, and the training state "
                                         "that --resume uses).")
    resume: bool = option(False, "Continue an interrupted run from its last checkpoint (same options); ends "
                                 "with the same weights as an uninterrupted run. Does nothing if the checkpoint "
                                 "is complete.")
    overwrite: bool = overwrite_option("an existing checkpoint, log and training state")
    allow_incomplete: bool = option(False, "Train on a store whose harvest has not finished.")
    storage_options: tuple = remote.storage_options_option()
    factorization: str | None = option(
        None, "fmx: how encoder and decoder (layer x activation x latent) tensors are factorized: tr, a tensor "
              "ring, W[l,a,i] = trace(G_layer[l] G_act[a] G_latent[i]); cp, a CP decomposition, W[l,a,i] = "
              "sum_r layer[l,r] act[a,r] latent[i,r]. Default: tr.", choices=FACTORIZATIONS)
    ranks: tuple[int, ...] | None = option(
        None, "fmx: the ranks, R1,R2,R3 for tr (one number sets all three) or R for cp. Default: ceil(sqrt(L*d)) "
              "each for tr and L*d for cp (L layers of width d), so the joint rank is not limited; lower ranks "
              "share more across layers but reconstruct worse.", metavar="R[,R2,R3]", parse=whole_numbers)
    mask_prob: float | None = option(
        None, "Stochastic layer masking: in training, zero each read source's encoder input per token with this "
              "probability, while the loss still reconstructs the clean activations. Default: 0.05 for fmx "
              "archs, 0 otherwise.")
    split_sources: bool = option(
        False, "Under torchrun: split the sources over the ranks instead of training data-parallel, for a "
               "crosscoder too big for one GPU (many layers). Each rank holds the encoder, decoder and Adam state "
               "of a contiguous group of sources (balanced by width), reads only their columns of the store and "
               "trains on every batch; the ranks exchange the B x F encoder sums and the latent gradients. topk "
               "and batchtopk only; at most as many ranks as sources. The checkpoint and training state are the "
               "usual ones (rank 0 needs host memory for the whole crosscoder). No effect in one process.")
    shared_latents: int = option(
        0, "Designated shared latents: the first N latents have one decoder direction per site and layer, tied "
           "across the models (gradients summed over the copies, rows kept equal after each step), so that "
           "structure the models share is cheap to explain and the other latents are left to what differs. "
           "Needs two or more models writing the same sites, layers and widths. See --shared-penalty.",
        metavar="N")
    shared_penalty: float | None = option(
        None, "relu: the L1 penalty of the --shared-latents relative to the others' (default 0.15; Anthropic "
              "use 0.1-0.2). topk and batchtopk have no penalty to scale: their shared latents compete for the "
              "k slots on the same score as the others, so this option is refused there.")
    exclusive: tuple[str, ...] = option(
        (), "Dedicated latents (dedicated-feature crosscoder): N latents whose decoders write only MODEL's sources; "
            "their decoder rows for every other model are held at exactly zero. Repeat for several models; the "
            "blocks follow the --shared-latents, in the order given. The rest of the latents stay free.",
        metavar="MODEL=N", multiple=True, parse=model_count)

    @property
    def activation(self) -> str:
        """relu, topk or batchtopk."""
        return activation_of(self.arch)

    def __post_init__(self):
        def positive(name, value, zero_ok=False):
            if value is None:
                return
            if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                raise BadInput(f"--{name.replace('_', '-')} {value} must be {'>= 0' if zero_ok else 'positive'}"
                               f" and finite")

        if not self.stores:
            raise BadInput("give at least one activation store")
        remote.configure(self.storage_options)  # before any store is opened
        if self.arch not in TRAIN_ARCHS:
            raise BadInput(f"--arch {self.arch!r} is not known; use one of {', '.join(TRAIN_ARCHS)}")
        if self.dtype not in DTYPES:
            raise BadInput(f"--dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        for label, names in (("--sources", self.sources), ("--read", self.read), ("--write", self.write)):
            if names is not None and not names:
                raise BadInput(f"{label} names no source; give one or more source names, separated by commas")
        if self.latents is not None and self.expansion is not None:
            raise BadInput("--latents and --expansion both set the dictionary size; give one of them")
        if self.tokens is not None and self.steps is not None:
            raise BadInput("--tokens and --steps both set the length of training; give one of them")
        if self.k is not None and self.activation == "relu":
            raise BadInput("--k applies to --arch topk and batchtopk; relu uses --l1")
        if self.k is not None and self.activation == "jumprelu":
            raise BadInput("--k applies to --arch topk and batchtopk; jumprelu learns a threshold per latent "
                           "(use --tanh-penalty for sparsity)")
        jump_options = ("tanh_penalty", "tanh_scale", "preact_penalty", "bandwidth", "initial_threshold")
        if self.activation != "jumprelu":
            for name in jump_options:
                if getattr(self, name) is not None:
                    raise BadInput(f"--{name.replace('_', '-')} applies to --arch jumprelu, not {self.arch}")
        if self.activation == "jumprelu" and self.k_aux:
            raise BadInput("--k-aux applies to --arch topk and batchtopk; jumprelu's pre-activation loss "
                           "(--preact-penalty) keeps latents alive instead")
        if self.l1 is not None and self.activation != "relu":
            sparsity = "--tanh-penalty" if self.activation == "jumprelu" else "--k"
            raise BadInput(f"--l1 applies to --arch relu; {self.arch} uses {sparsity}")
        for name in ("latents", "expansion", "k", "batch_size", "tokens", "steps", "lr", "dead_tokens",
                     "shuffle_buffer", "log_every", "checkpoint_every", "tanh_scale", "bandwidth", "initial_threshold"):
            positive(name, getattr(self, name))
        for name in ("l1", "warmup", "clip", "k_aux", "tanh_penalty", "preact_penalty"):
            positive(name, getattr(self, name), zero_ok=True)
        if not 0 <= self.decay <= 1:
            raise BadInput(f"--decay {self.decay} must be between 0 and 1")
        if not 0 <= self.eval_fraction < 1:
            raise BadInput(f"--eval-fraction {self.eval_fraction} must be at least 0 and below 1")
        if self.resume and self.overwrite:
            raise BadInput("--resume continues a run and --overwrite starts over; give one of them")
        if self.log is not None and Path(self.log).resolve() == Path(self.output).resolve():
            raise BadInput(f"--log {self.log!r} is the checkpoint -o names; give the metrics another file")
        check_fmx_options(self.arch, self.factorization, self.ranks, self.mask_prob)
        if self.groups is not None:
            if self.arch != MATRYOSHKA:
                raise BadInput(f"--groups applies to --arch {MATRYOSHKA}, not to {self.arch}")
            object.__setattr__(self, "groups", check_prefix_widths(self.groups, self.latents))
        if self.split_sources and self.arch not in SOURCE_PARALLEL_ARCHS:
            raise BadInput(f"--split-sources trains --arch {' or '.join(SOURCE_PARALLEL_ARCHS)}, not {self.arch}")
        if self.split_sources and self.mask_prob:
            raise BadInput("--mask-prob does not combine with --split-sources")
        check_device(self.device)
        self.check_partition()

    def check_partition(self) -> None:
        """The --shared-latents / --exclusive options by themselves (the models are checked against the stores)."""
        try:
            object.__setattr__(self, "exclusive", tuple(model_count(t) for t in self.exclusive))
        except ValueError as e:
            raise BadInput(f"--exclusive {e}") from None
        counts = exclusive_counts(self.exclusive)
        if self.shared_latents < 0:
            raise BadInput(f"--shared-latents {self.shared_latents} must be 0 or more")
        if self.shared_penalty is not None:
            if not self.shared_latents:
                raise BadInput("--shared-penalty applies to --shared-latents; give --shared-latents N")
            if self.activation != "relu":
                raise BadInput(f"--shared-penalty scales an L1 penalty, which --arch {self.arch} does not have; "
                               f"use --arch relu or leave it out")
            if not (math.isfinite(self.shared_penalty) and 0 < self.shared_penalty <= 1):
                raise BadInput(f"--shared-penalty {self.shared_penalty} must be above 0 and at most 1")
        if (self.shared_latents or counts) and (is_fmx(self.arch) or self.split_sources):
            what = "--split-sources" if self.split_sources else f"--arch {self.arch}"
            raise BadInput(f"--shared-latents and --exclusive do not combine with {what}; use --arch relu, topk "
                           f"or batchtopk in one process or data-parallel")

    def hyperparameters(self) -> dict:
        """The fields that determine the weights (recorded in the checkpoint, compared on resume)."""
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items() if k not in RUN_CONTROL}


@dataclass(frozen=True)
class ConvertConfig:
    """Everything `xc convert` needs: a BatchTopK checkpoint becomes a JumpReLU one (xcli.train.convert)."""

    checkpoint: str = option(help="The BatchTopK checkpoint (.safetensors); - reads its path from stdin.",
                             argument=True, metavar="CHECKPOINT")
    stores: tuple[str, ...] = option(help="Activation stores holding the checkpoint's sources (rows lined up).",
                                     argument=True, multiple=True, metavar="STORE...")
    output: str = option(help="The JumpReLU checkpoint to write (.safetensors; format in xc-checkpoint(5)).",
                         flags=("-o", "--output"), metavar="FILE")
    all_rows: bool = option(False, "Calibrate on every row of the stores (stores the checkpoint was not trained "
                                   "on). Default: the rows `xc train` held out.")
    max_rows: int = option(65536, "Calibrate on at most this many rows (whole chunks, the first ones); they are "
                                  "held in memory.", metavar="N", parse=count)
    batch_size: int | None = option(None, "Rows per BatchTopK selection (the k*B best of each batch) when finding "
                                          "each latent's smallest selected pre-activation. Default: the batch size "
                                          "the checkpoint was trained with, else 4096.", metavar="N", parse=count)
    target_l0: float | None = option(None, "Mean active latents per row the thresholds are scaled to on the "
                                           "calibration rows. Default: the checkpoint's k.")
    device: str = device_option("the calibration runs")
    overwrite: bool = overwrite_option("an existing output checkpoint")
    storage_options: tuple = remote.storage_options_option()

    def __post_init__(self):
        remote.configure(self.storage_options)
        if not self.stores:
            raise BadInput("give at least one activation store")
        if self.max_rows < 1:
            raise BadInput(f"--max-rows {self.max_rows} must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise BadInput(f"--batch-size {self.batch_size} must be at least 1")
        if self.target_l0 is not None and not (math.isfinite(self.target_l0) and self.target_l0 > 0):
            raise BadInput(f"--target-l0 {self.target_l0} must be positive and finite")
        check_device(self.device)
