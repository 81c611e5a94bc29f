"""The options of `xc classify` and `xc eval`: one declaration each (xcli.options), no torch."""

from dataclasses import dataclass

from xcli import remote
from xcli.errors import BadInput
from xcli.lm.config import MODEL_DTYPES, check_device, device_option
from xcli.options import count, name_list, option, pair

ROW_FORMATS = ("jsonl", "csv", "table")
"""How `xc classify` writes its rows (xcli.analysis.classify.write_rows)."""


@dataclass(frozen=True)
class ClassifyConfig:
    models: tuple[str, str] | None = option(
        None, "The two models to compare: r, delta norm and cosine are oriented B over A (1 = only B). Default: "
              "the two models in checkpoint order.", metavar="A,B", parse=name_list)
    exclusive_share: float = option(0.9, "Exclusive to a model when it holds at least this share of the latent's "
                                         "decoder norm (two models: r <= 0.1 or r >= 0.9).")
    shared_band: tuple[float, float] = option(
        (0.3, 0.7), "Shared when LOW <= r <= HIGH; with more than two models, when every model holds at least "
                    "2*LOW/n of the norm. Anything neither shared nor exclusive is 'mixed'.", metavar="LOW,HIGH",
        parse=pair(",", float, "LOW,HIGH (e.g. 0.3,0.7)"), cli_default="0.3,0.7")
    dead_frequency: float = option(0.0, "With --store: dead when the latent fires on at most this fraction of "
                                        "tokens. Without a store only latents with no decoder norm are dead.")
    nu_epsilon: float = option(0.2, "Latent Scaling: an exclusive latent with nu_epsilon at or above this is "
                                    "flagged 'shrinkage' (the other model carries its direction in its "
                                    "reconstruction error).")
    nu_r: float = option(0.5, "Latent Scaling: an exclusive latent with nu_r at or above this is flagged "
                              "'decoupling' (other latents rebuild its direction in the other model).")
    span_share: float = option(0.1, "Cross-layer: a layer is in a latent's span when it holds at least this "
                                    "share of the latent's decoder norm.")
    max_tokens: int | None = option(None, "With --store: use only the first N tokens.", metavar="N", parse=count)
    batch_elements: int = 1 << 22
    """At most this many tokens x latents per batch in the store pass (Python callers only)."""
    device: str = device_option("the store pass runs")
    storage_options: tuple = remote.storage_options_option()

    def __post_init__(self):
        remote.configure(self.storage_options)  # before any store is opened
        if self.models is not None:
            object.__setattr__(self, "models", tuple(self.models))
        if self.models is not None and (len(self.models) != 2 or self.models[0] == self.models[1]):
            raise BadInput(f"--models {','.join(self.models)!r} must name two different models, as A,B")
        if not 0.5 < self.exclusive_share <= 1:
            raise BadInput(f"--exclusive-share {self.exclusive_share} must be above 0.5 and at most 1")
        low, high = self.shared_band
        if not 0 <= low <= high <= 1:
            raise BadInput(f"--shared-band {low},{high} must be LOW,HIGH with 0 <= LOW <= HIGH <= 1")
        if not 0 <= self.dead_frequency < 1:
            raise BadInput(f"--dead-frequency {self.dead_frequency} must be in [0, 1)")
        if self.nu_epsilon <= 0 or self.nu_r <= 0:
            raise BadInput(f"--nu-epsilon {self.nu_epsilon} and --nu-r {self.nu_r} must be positive")
        if not 0 < self.span_share <= 1:
            raise BadInput(f"--span-share {self.span_share} must be in (0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise BadInput(f"--max-tokens {self.max_tokens} must be at least 1")
        if self.batch_elements < 1:
            raise BadInput(f"batch_elements {self.batch_elements} must be at least 1")
        check_device(self.device)


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str = option(help="The crosscoder checkpoint (.safetensors); - reads its path from stdin.",
                             argument=True, metavar="CHECKPOINT|-")
    stores: tuple[str, ...] = option(help="Activation stores holding the checkpoint's sources (rows lined up, as "
                                          "for `xc train`).", argument=True, multiple=True, metavar="STORE...")
    all_rows: bool = option(False, "Evaluate on every row of the stores. Default: the rows `xc train` held out "
                                   "(its --eval-fraction chunks); that needs the stores it was trained on.")
    truth: str | None = option(
        None, "Planted truth of a synthetic store (STORE.truth.safetensors, from `xc synth`): adds the mean max "
              "cosine similarity, the fraction of planted features recovered, both by kind and by layer span, "
              "the reverse MMCS over latents that fire, and (two or more models) how often `xc classify` gives a "
              "feature's best latent the class of the planted feature.", metavar="TRUTH")
    threshold: float = option(0.9, "With --truth: a planted feature is recovered when a latent's decoder has a "
                                   "cosine above this (all sources concatenated, raw units).")
    models: tuple[str, ...] = option(
        (), "A model to splice into (implies --splice); ALIAS is the model name in the checkpoint's sources. "
            "Repeat for each model. Every model the crosscoder reads from is needed.", flags=("--model",),
        metavar="ALIAS=PATH", multiple=True)
    splice: bool = option(False, "Measure the spliced-in next-token loss of each model, with the models the "
                                 "store's harvest recorded (local folders or the local Hugging Face cache; never "
                                 "downloaded).")
    data: str | None = option(None, "Measure the spliced-in loss on this text file (one sequence per line) "
                                    "instead of the store's token windows. On an aligned store each line is a "
                                    "document, aligned and cut into windows as the harvest would.",
                              metavar="TEXT")
    windows: int = option(64, "Token windows (sequences) the spliced-in loss is measured on, at most; spread "
                              "evenly over the evaluated rows.")
    batch_size: int = option(4096, "Rows per batch for FVU, L0 and dead latents.", metavar="N", parse=count)
    window_batch: int = option(4, "Windows per forward pass. Each holds B x T x vocabulary log-probabilities "
                                  "three times: lower it for large vocabularies.")
    device: str = device_option("the crosscoder and the models run")
    dtype: str = option("auto", "Language-model weights for the spliced-in loss; auto is bfloat16 on a GPU that "
                                "supports it, else float32. The crosscoder runs in float32.",
                        choices=("auto", *MODEL_DTYPES))
    allow_incomplete: bool = option(False, "Accept a store whose harvest has not finished.")
    storage_options: tuple = remote.storage_options_option()

    def __post_init__(self):
        remote.configure(self.storage_options)  # before any store is opened
        object.__setattr__(self, "stores", tuple(self.stores))
        object.__setattr__(self, "models", tuple(self.models))
        if not self.stores:
            raise BadInput("give at least one activation store")
        if not 0 < self.threshold < 1:
            raise BadInput(f"--threshold {self.threshold} must be between 0 and 1")
        for name in ("windows", "batch_size", "window_batch"):
            if getattr(self, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.data is not None and not (self.splice or self.models):
            raise BadInput("--data is text for the spliced-in loss; add --splice or --model ALIAS=PATH")
