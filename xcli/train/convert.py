"""`xc convert`: a BatchTopK crosscoder as a JumpReLU one with per-latent thresholds.

    from xcli.train.convert import ConvertConfig, convert
    path, report = convert(ConvertConfig(checkpoint="btk.safetensors", stores=("acts.zarr",), output="jr.safetensors"))

The weights stay; the thresholds come from `from_batchtopk`, calibrated on
store rows (by default the rows `xc train` held out), so that the mean L0 there is k. The report
holds L0 and FVU of both models on those rows.
"""

from pathlib import Path

import numpy as np
import torch

from xcli import console
from xcli.analysis.evaluate import check_sources, eval_rows
from xcli.analysis.reconstruction import reconstruction
from xcli.crosscoder import jumprelu
from xcli.crosscoder.model import Crosscoder, load, save
from xcli.data.loader import StoreSet, eval_batches
from xcli.devices import resolve_device
from xcli.errors import BadInput
from xcli.files import check_output, check_replaceable, output_lock
from xcli.train.config import ConvertConfig

DEFAULT_BATCH_SIZE = 4096


def calibration_chunks(stores: StoreSet, chunks, max_rows: int) -> np.ndarray:
    """The first of `chunks` up to `max_rows` rows (whole chunks, at least one)."""
    kept, total = [], 0
    for c in chunks:
        if kept and total >= max_rows:
            break
        kept.append(int(c))
        start, stop = stores.chunk_range(int(c))
        total += stop - start
    return np.asarray(kept, dtype=np.int64)


def from_batchtopk(model, batches, target_l0: float | None = None):
    """A JumpReLU crosscoder that encodes like the BatchTopK `model` (the same weights) with one threshold
    per latent, calibrated on `batches` (a list of dicts of raw activations, read twice):

    1. θ_i = the smallest pre-activation of latent i that BatchTopK's training selection kept
       (crosslayer-coding's conversion; a latent never kept never fires);
    2. one factor on all θ so that the mean L0 on the batches is `target_l0` (default k), which
       the per-latent minima alone overshoot: a minimum over many batches lies below the typical
       selection boundary.

    Returns (the JumpReLU model in eval mode, {"scale": the factor, "never_selected": count})."""
    if model.arch != "batchtopk":
        raise ValueError(f"from_batchtopk converts a batchtopk crosscoder, not {model.arch}")
    theta = jumprelu.selected_minima(model, batches)
    scale = jumprelu.l0_scale(model, batches, theta, model.k if target_l0 is None else target_l0)
    out = Crosscoder(model.sources, model.n_latents, "jumprelu", None, model.read, model.write)
    out.load_state_dict({k: v for k, v in model.state_dict().items() if k != "threshold"}, strict=False)
    out.input_scale.copy_(model.input_scale)
    out.partition = model.partition
    out.set_thresholds(torch.where(torch.isfinite(theta), theta * scale, jumprelu.NEVER_FIRES).cpu())
    return out.to(model.b_enc.device).eval(), {"scale": scale, "never_selected": int((~torch.isfinite(theta)).sum())}


def convert(cfg: ConvertConfig) -> tuple[Path, dict]:
    """Write the JumpReLU checkpoint; return its path and a report (L0 and FVU before and after)."""
    if cfg.overwrite:
        check_replaceable(cfg.output, "checkpoint", (cfg.checkpoint, *cfg.stores))
    check_output(cfg.output, overwrite=cfg.overwrite)
    device = resolve_device(cfg.device)
    model = load(cfg.checkpoint, device)
    if model.arch != "batchtopk":
        raise BadInput(f"{cfg.checkpoint!r} is a {model.arch} crosscoder; xc convert turns a batchtopk one into "
                       f"jumprelu")
    if model.partition is not None:
        raise BadInput(f"{cfg.checkpoint!r} has tied or dedicated latents; xc convert does not carry them over")
    stores = StoreSet(cfg.stores)
    check_sources(model, stores)
    chunks, which = eval_rows(model, stores, cfg.all_rows)
    chunks = calibration_chunks(stores, chunks, cfg.max_rows)
    if len(chunks) == 0:
        raise BadInput("there are no rows to calibrate on; pass --all-rows to use every row of the stores")
    recorded = model.metadata.get("hyperparameters", {}).get("batch_size")
    batch_size = cfg.batch_size or (recorded if isinstance(recorded, int) and recorded > 0 else DEFAULT_BATCH_SIZE)
    with output_lock(cfg.output):
        batches = [{n: t.to(device).float() for n, t in b.items()}
                   for b in eval_batches(stores, model.read, chunks, batch_size)]
        rows = sum(len(next(iter(b.values()))) for b in batches)
        console.info(f"calibrating {model.n_latents} thresholds on {rows} {which} rows")
        converted, found = from_batchtopk(model, batches, cfg.target_l0)
        del batches
        before = reconstruction(model, stores, chunks, batch_size, device)
        after = reconstruction(converted, stores, chunks, batch_size, device)
        report = {"rows": rows, "which": which, "target_l0": cfg.target_l0 or model.k, "batch_size": batch_size,
                  "scale": found["scale"], "never_selected": found["never_selected"],
                  "batchtopk": {"l0": before.l0, "fvu_total": before.fvu_total},
                  "jumprelu": {"l0": after.l0, "fvu_total": after.fvu_total}}
        console.info(f"L0 {before.l0:.2f} -> {after.l0:.2f}, FVU {before.fvu_total:.4f} -> {after.fvu_total:.4f} "
                     f"on the calibration rows; {found['never_selected']} latents never selected (they never fire)")
        meta = model.metadata
        extra = {key: meta[key] for key in ("store", "hyperparameters") if key in meta}
        extra["converted"] = {"from": str(Path(cfg.checkpoint).resolve()), "from_arch": "batchtopk", "k": model.k,
                              "method": "per-latent minimum selected pre-activation, then one factor for the L0",
                              **report}
        with torch.no_grad():
            path = save(converted, cfg.output, extra=extra, overwrite=cfg.overwrite)
    return path, report
