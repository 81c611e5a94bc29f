"""Summarise what the quick start found, from the files the xc commands wrote.

    python examples/report.py WORKDIR

Reads WORKDIR/pair/pair.json (the trigger and the planted phrase), latents.jsonl (xc classify),
np-export/ (xc export: top activating examples and the logit lens of each latent),
amplify.jsonl (xc amplify --count), eval.json (xc eval) and export-check.json (xc export --check);
and, from the second run (xc train --shared-latents --exclusive tuned=N), dfc-latents.jsonl and
np-export-dfc/.
Prints a short report and writes the same findings as WORKDIR/findings.json.
"""

import collections
import gzip
import json
import sys
from pathlib import Path

SHARED_SHOWN = 8  # shared latents listed, most frequent first
CHANGED_SHOWN = 3  # latents whose decoders differ most between the models, listed
MIN_FREQUENCY = 0.005  # rarer latents have noisy decoders: left out of the ranking of changes


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def export_source(export: Path, model: str) -> Path:
    """The export folder of the first source of `model` (every source has the same examples)."""
    manifest = json.loads((export / "xc-export.json").read_text())
    for source in manifest["sources"]:
        if source["model"] == model:
            return export / "v1" / source["modelId"] / source["sourceId"]
    raise SystemExit(f"report: no source of model {model!r} in {export}/xc-export.json")


def read_batches(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("batch-*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f]
    return rows


def top_examples(source: Path) -> dict[int, list[tuple[str, str]]]:
    """latent -> (token, previous token) of each top activating example."""
    examples = collections.defaultdict(list)
    for row in read_batches(source / "activations"):
        if row["binMin"] != -1:  # interval samples; top examples have binMin = -1
            continue
        q, tokens = row["qualifyingTokenIndex"], row["tokens"]
        examples[int(row["index"])].append((tokens[q], tokens[q - 1] if q > 0 else ""))
    return examples


def logit_lens(source: Path) -> dict[int, list[str]]:
    return {int(row["index"]): row.get("pos_str", [])[:3] for row in read_batches(source / "features")}


def describe(examples: list[tuple[str, str]]) -> dict:
    on = collections.Counter(t for t, _ in examples).most_common(1)
    before = collections.Counter(p for _, p in examples).most_common(1)
    return {"n": len(examples), "token": on[0] if on else None, "previous": before[0] if before else None}


def main(work: Path) -> dict:
    pair = json.loads((work / "pair" / "pair.json").read_text())
    trigger = pair["trigger"]
    rows = read_jsonl(work / "latents.jsonl")
    tuned = export_source(work / "np-export", "tuned")
    examples, lens = top_examples(tuned), logit_lens(tuned)
    counts = collections.Counter(r["class"] for r in rows)

    def summary(r: dict) -> dict:
        ex = examples.get(r["latent"], [])
        return {"latent": r["latent"], "class": r["class"], "change": change(r), "rel_norm": r["rel_norm_B_over_A"],
                "cosine": r.get("cosine_A_B"), "frequency": r.get("frequency"), "ls_verdict": r.get("ls_verdict"),
                "top_examples": len(ex), "on_trigger": sum(t == trigger for t, _ in ex),
                "after_trigger": sum(p == trigger for _, p in ex), "logit_lens": lens.get(r["latent"], []),
                **describe(ex)}

    exclusive = [summary(r) for r in sorted(rows, key=lambda r: -r["rel_norm_B_over_A"])
                 if r["class"] == "exclusive:tuned"]
    firing = [r for r in rows if r["class"] != "dead" and (r.get("frequency") or 0) >= MIN_FREQUENCY]
    changed = [summary(r) for r in sorted(firing, key=change, reverse=True)[:CHANGED_SHOWN]]
    shared = []
    for r in sorted((r for r in rows if r["class"] == "shared"), key=lambda r: -(r.get("frequency") or 0)):
        shared.append({"latent": r["latent"], "rel_norm": r["rel_norm_B_over_A"], "cosine": r.get("cosine_A_B"),
                       "frequency": r.get("frequency"), **describe(examples.get(r["latent"], []))})
    rates = [{k: c[k] for k in ("alpha", "matches", "n", "rate", "ci95")}
             for c in read_jsonl(work / "amplify.jsonl") if c.get("kind") == "count"]
    evaluation = json.loads((work / "eval.json").read_text())
    check = json.loads((work / "export-check.json").read_text())
    findings = {"trigger": trigger, "phrase": pair["phrase"], "classes": dict(counts), "exclusive_tuned": exclusive,
                "most_changed": changed, "shared": shared, "rates": rates,
                "exclusive_on_trigger": any(on_trigger(e) for e in exclusive),
                "most_changed_on_trigger": bool(changed) and on_trigger(changed[0]),
                "eval": {k: evaluation.get(k) for k in ("fvu_total", "l0", "dead_fraction")}
                | {"splice": evaluation.get("splice")},
                "export_check": check}
    if (work / "dfc-latents.jsonl").exists():
        findings.update(dedicated_run(work, trigger))
    (work / "findings.json").write_text(json.dumps(findings, indent=1) + "\n")
    print_report(findings, len(rows))
    return findings


def dedicated_run(work: Path, trigger: str) -> dict:
    """The second run: latents dedicated to the tuned model (their base decoder is zero by construction)."""
    rows = read_jsonl(work / "dfc-latents.jsonl")
    examples = top_examples(export_source(work / "np-export-dfc", "tuned"))
    dedicated = []
    for r in sorted(rows, key=lambda r: -(r.get("frequency") or 0)):
        if r["class"] == "dedicated:tuned":
            ex = examples.get(r["latent"], [])
            dedicated.append({"latent": r["latent"], "frequency": r.get("frequency"), "ls_verdict": r.get("ls_verdict"),
                              "top_examples": len(ex), "on_trigger": sum(t == trigger for t, _ in ex),
                              "after_trigger": sum(p == trigger for _, p in ex), **describe(ex)})
    used = [x for x in dedicated if (x["frequency"] or 0) >= MIN_FREQUENCY]
    return {"dedicated_classes": dict(collections.Counter(r["class"] for r in rows)), "dedicated_tuned": dedicated,
            "dedicated_on_trigger": any(on_trigger(x) for x in used)}


def change(row: dict) -> float:
    """||d_tuned - d_base|| / (||d_base|| + ||d_tuned||): 0 for equal decoders, 1 for one model only.

    Exclusive latents score near 1, and so do latents both models have but whose decoders point
    different ways (a feature the fine-tune changed); shared, unchanged latents score near 0.
    """
    a, b, cos = row["norm"]["base"], row["norm"]["tuned"], row.get("cosine_A_B") or 0.0
    return max(a * a + b * b - 2 * a * b * cos, 0.0) ** 0.5 / max(a + b, 1e-12)


def on_trigger(latent: dict) -> bool:
    """Most of the latent's top activating examples sit on the trigger or right after it."""
    return latent["on_trigger"] + latent["after_trigger"] >= 0.8 * latent["top_examples"] > 0


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fires(d: dict) -> str:
    if not d["token"]:
        return "no top examples"
    (token, k), (prev, j) = d["token"], d["previous"]
    return f"on '{token}' in {k}/{d['n']} top examples, after '{prev}' in {j}/{d['n']}"


def print_latent(x: dict, trigger: str) -> None:
    print(f"  latent {x['latent']:3d}  {x['class']:15s}  change {x['change']:.2f}  r {x['rel_norm']:.3f}  "
          f"cosine {x['cosine']:.2f}  "
          f"fires on {pct(x['frequency'])} of tokens  Latent Scaling: {x['ls_verdict'] or '-'}")
    print(f"      top examples: {x['on_trigger']}/{x['top_examples']} on '{trigger}', "
          f"{x['after_trigger']}/{x['top_examples']} right after it ({fires(x)}); "
          f"logit lens of its tuned decoder: {', '.join(x['logit_lens'])}")


def print_report(f: dict, n_latents: int) -> None:
    trigger = f["trigger"]
    print(f"Planted: after '{trigger}' the tuned model often says '{f['phrase']}'; the base model never does.")
    print(f"\nCrosscoder: {n_latents} latents: " + ", ".join(f"{v} {k}" for k, v in sorted(f["classes"].items())))
    e = f["eval"]
    splice = e.get("splice") or {}
    print(f"  held-out FVU {e['fvu_total']:.4f}, L0 {e['l0']:.2f}; spliced-in CE score "
          + ", ".join(f"{m} {s['ce_score']:.3f}" for m, s in splice.items() if s.get("ce_score") is not None))

    print(f"\nLatents exclusive to the tuned model ({len(f['exclusive_tuned'])}):")
    for x in f["exclusive_tuned"]:
        print_latent(x, trigger)
    if not f["exclusive_tuned"]:
        print("  none: a crosscoder may write a fine-tune's change into a latent both models share;"
              " the latents that changed most show it")
    print(f"\nThe {CHANGED_SHOWN} latents whose decoders differ most between the models "
          "(change = |d_tuned - d_base| / (|d_base| + |d_tuned|)):")
    for x in f["most_changed"]:
        print_latent(x, trigger)
    found = f["most_changed_on_trigger"]
    print(f"  -> the planted difference {'was' if found else 'was NOT'} found: the most changed latent "
          f"{'sits' if found else 'does not sit'} on '{trigger}' or right after it"
          + ("; it is exclusive to the tuned model" if f["exclusive_on_trigger"] else ""))

    print(f"\nShared latents, the grammar both models know ({len(f['shared'])}; the {SHARED_SHOWN} most frequent):")
    for x in f["shared"][:SHARED_SHOWN]:
        print(f"  latent {x['latent']:3d}  r {x['rel_norm']:.2f}  cosine {x['cosine']:.2f}  "
              f"{pct(x['frequency']):>6} of tokens  {fires(x)}")

    print(f"\nRate of '{f['phrase']}' after prompts ending in '{trigger}', sampling from "
          "tuned + alpha (tuned - base):")
    for r in f["rates"]:
        label = {-1: " (= base)", 0: " (= tuned)"}.get(r["alpha"], "")
        low, high = r["ci95"]
        print(f"  alpha {r['alpha']:>4g}{label:10s} {r['matches']:4d}/{r['n']:<4d} {pct(r['rate']):>6}  "
              f"(95% CI {pct(low)}-{pct(high)})")
    if "dedicated_tuned" in f:
        print("\nSecond run, every latent tied across the models or dedicated to tuned "
              "(xc train --shared-latents 20 --exclusive tuned=4): "
              + ", ".join(f"{v} {k}" for k, v in sorted(f["dedicated_classes"].items())))
        for x in f["dedicated_tuned"]:
            print(f"  latent {x['latent']:3d}  dedicated:tuned  fires on {pct(x['frequency'])} of tokens  "
                  f"Latent Scaling: {x['ls_verdict'] or '-'}  top examples: {x['on_trigger']}/{x['top_examples']} "
                  f"on '{trigger}', {x['after_trigger']}/{x['top_examples']} right after it ({fires(x)})")
        found = f["dedicated_on_trigger"]
        print(f"  -> a latent dedicated to the tuned model {'sits' if found else 'does NOT sit'} on '{trigger}' "
              f"or right after it: the planted difference {'was' if found else 'was not'} found as a "
              f"tuned-exclusive latent")
    c = f["export_check"]
    print(f"\nNeuronpedia export: {len(c['sources'])} sources, {c['features']} features, {c['activations']} "
          f"activation records; xc export --check found no problems ({len(c['warnings'])} warnings)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1].strip())
    main(Path(sys.argv[1]))
