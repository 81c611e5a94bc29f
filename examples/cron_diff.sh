#!/usr/bin/env bash
# Diff the newest checkpoint of a training run against the one before it, from cron.
#
#   cron_diff.sh --data CORPUS --layers SPEC [options] RUN_DIR
#
# RUN_DIR holds one Hugging Face model folder per checkpoint (a folder with a config.json,
# e.g. checkpoint-1000/, checkpoint-2000/); "newest" is the last name in version order
# (sort -V). The two newest are harvested into one store, a crosscoder is trained on them
# and its latents are classified; one JSON line is appended to the log. Exit status:
#   0  diffed, or nothing to do (fewer than two checkpoints, pair already diffed, another run busy)
#   3  more than --threshold latents are exclusive to the newest checkpoint
#   4  with --registry: a watched feature is gone, weakened or changed class in the newest
#      checkpoint (one line per feature on stderr says which and why; wins over 3)
#   1  a step failed (its error is on stderr; the next run resumes where it stopped)
#   2  bad usage
# With --registry, each diffed pair's crosscoder is also added to an `xc track` feature registry
# (xc track add), so features keep their ids from checkpoint to checkpoint; the pairs are then
# taken in order from the last one tracked, one pair per run, so that no checkpoint is skipped.
# A pair is diffed once: a second run with nothing new does no work. Runs hold a lock
# (flock) on STATE/lock, so overlapping cron runs exit at once instead of piling up.
# Informational messages go to stderr only when it is a terminal, so cron mails only
# errors and alerts.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --data FILE          corpus to harvest (xc harvest --data); required
  --layers SPEC        layers to harvest (xc harvest --layers); required
  --site SITE          site to harvest [resid_post]
  --tokens N           tokens to harvest [the whole corpus]
  --context-length N   tokens per window [the harvest default]
  --chunk-rows N       rows per store chunk; training holds out whole chunks [the harvest default]
  --latents N          crosscoder size [xc train default]
  --k N                active latents per token [xc train default]
  --train-tokens N     training tokens [one pass over the store]
  --batch-size N       training tokens per step [xc train default]
  --train-options OPTS more options for xc train, e.g. '--arch topk --lr 3e-3' []
  --threshold N        exit 3 when more than N latents are exclusive to the newest checkpoint [10]
  --min-age SECONDS    ignore checkpoints with a file modified less than this long ago (still being
                       written) [600]
  --state DIR          stores, crosscoders, classes and the lock [RUN_DIR/.xc-diff]
  --log FILE           the summary log, one JSON line per diffed pair [STATE/diff.log]
  --keep-store         keep each pair's activation store (deleted after classifying by default; with
                       --registry the newest pair's store is kept for matching the next pair)
  --registry REG       also add each pair to this xc track registry (an SQLite file or a PostgreSQL
                       URL); exit 4 on a watched feature (name features with xc track name)
  --track-options OPTS more options for xc track add, e.g. '--exclusive-share 0.8' []
  --device DEV         device for all steps [auto]
Environment: XC, the xc command [xc on PATH, else this repository's .venv/bin/xc];
PYTHON, a Python 3 for counting classes [python3].
EOF
}

say() { [ -t 2 ] && echo "cron_diff: $*" >&2 || true; }  # info: only on a terminal
die() { echo "cron_diff: $*" >&2; exit 2; }

data="" layers="" site="resid_post" tokens="" context="" chunk_rows="" latents="" k="" train_tokens="" batch=""
threshold=10 min_age=600 state="" log="" keep_store=0 device="auto" run="" registry="" track_options="" train_options=""
while [ $# -gt 0 ]; do
    case "$1" in
        --data) data=$2; shift 2 ;;
        --layers) layers=$2; shift 2 ;;
        --site) site=$2; shift 2 ;;
        --tokens) tokens=$2; shift 2 ;;
        --context-length) context=$2; shift 2 ;;
        --chunk-rows) chunk_rows=$2; shift 2 ;;
        --latents) latents=$2; shift 2 ;;
        --k) k=$2; shift 2 ;;
        --train-tokens) train_tokens=$2; shift 2 ;;
        --batch-size) batch=$2; shift 2 ;;
        --threshold) threshold=$2; shift 2 ;;
        --min-age) min_age=$2; shift 2 ;;
        --state) state=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --keep-store) keep_store=1; shift ;;
        --registry) registry=$2; shift 2 ;;
        --track-options) track_options=$2; shift 2 ;;
        --train-options) train_options=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$run" ] || die "one RUN_DIR only, got '$run' and '$1'"; run=$1; shift ;;
    esac
done
[ -n "$run" ] || die "missing RUN_DIR (see --help)"
[ -d "$run" ] || die "RUN_DIR '$run' is not a folder"
[ -n "$data" ] || die "--data is required"
[ -e "$data" ] || die "--data '$data' does not exist"
[ -n "$layers" ] || die "--layers is required"
[[ "$threshold" =~ ^[0-9]+$ ]] || die "--threshold '$threshold' is not a whole number"
[[ "$min_age" =~ ^[0-9]+$ ]] || die "--min-age '$min_age' is not a whole number of seconds"
run=$(cd "$run" && pwd)
state=${state:-$run/.xc-diff}
log=${log:-$state/diff.log}
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${XC:-}" ]; then read -ra xc <<<"$XC"
elif command -v xc >/dev/null; then xc=(xc)
else xc=("$here/.venv/bin/xc")
fi
python=${PYTHON:-python3}
mkdir -p "$state"

exec 9>"$state/lock"
if ! flock -n 9; then say "another run holds $state/lock; nothing to do"; exit 0; fi

# The checkpoints: folders with a config.json, settled for --min-age seconds, in version order.
now=$(date +%s)
checkpoints=()
while IFS= read -r dir; do
    [ -f "$dir/config.json" ] || continue
    newest=$(find "$dir" -type f -printf '%T@\n' | sort -n | tail -1)
    [ $((now - ${newest%.*})) -ge "$min_age" ] && checkpoints+=("$dir")
done < <(find "$run" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | sort -V)
if [ ${#checkpoints[@]} -lt 2 ]; then say "fewer than two settled checkpoints in $run"; exit 0; fi
before=${checkpoints[-2]} after=${checkpoints[-1]}

alias_of() { basename "$1" | tr -c 'A-Za-z0-9_\n-' '_'; }
# With a registry: the pair after the last checkpoint tracked (STATE/tracked), if there is one.
if [ -n "$registry" ] && [ -f "$state/tracked" ]; then
    tracked=$(cat "$state/tracked") next=""
    for i in "${!checkpoints[@]}"; do
        if [ "$(alias_of "${checkpoints[$i]}")" = "$tracked" ]; then next=$((i + 1)); fi
    done
    if [ -n "$next" ]; then
        if [ "$next" -ge ${#checkpoints[@]} ]; then say "$tracked is the newest checkpoint; nothing to do"; exit 0; fi
        before=${checkpoints[$((next - 1))]} after=${checkpoints[$next]}
    fi
fi
a=$(alias_of "$before") b=$(alias_of "$after")
[ "$a" != "$b" ] || b="${b}_new"
# The pair's key: both checkpoints' files (name, size, mtime), the corpus and every option.
key=$( { for dir in "$before" "$after"; do (cd "$dir" && find . -type f -printf '%P %s %T@\n' | sort); done
         stat -c '%n %s %Y' "$data"
         echo "$layers $site $tokens $context $chunk_rows $latents $k $train_tokens $batch${registry:+ $registry}${train_options:+ $train_options}"; } | sha256sum | cut -c1-12)
pair="$state/pairs/$a--$b-$key"
if [ -f "$pair/summary.json" ]; then say "$a -> $b already diffed ($pair)"; exit 0; fi
mkdir -p "$pair"
say "diffing $a -> $b in $pair"

opt() { [ -z "$2" ] || printf '%s\n' "$1" "$2"; }  # an option and its value, if the value is set
mapfile -t harvest_opts < <(opt --tokens "$tokens"; opt --context-length "$context"; opt --chunk-rows "$chunk_rows")
mapfile -t train_opts < <(opt --latents "$latents"; opt --k "$k"; opt --tokens "$train_tokens"; opt --batch-size "$batch")
read -ra train_extra <<<"$train_options"

# --resume: an interrupted run (killed, rebooted) continues where it stopped next time.
"${xc[@]}" harvest --model "$a=$before" --model "$b=$after" --layers "$layers" --site "$site" \
    --data "$data" "${harvest_opts[@]}" --device "$device" -o "$pair/acts.zarr" --resume -q >/dev/null
"${xc[@]}" train "$pair/acts.zarr" -o "$pair/xc.safetensors" "${train_opts[@]}" --device "$device" \
    --log "$pair/train.jsonl" "${train_extra[@]}" --resume -q >/dev/null
"${xc[@]}" classify "$pair/xc.safetensors" --store "$pair/acts.zarr" --models "$a,$b" --device "$device" \
    -o "$pair/latents.jsonl" --overwrite -q >/dev/null

# Add the pair to the registry; a rerun adds nothing (xc track add knows the checkpoint's bytes).
watch=0
if [ -n "$registry" ]; then
    track_stores=(--store "$pair/acts.zarr")
    previous=$(cat "$state/tracked_pair" 2>/dev/null || true)
    if [ -n "$previous" ] && [ "$previous" != "$pair" ] && [ -d "$previous/acts.zarr" ]; then
        track_stores+=(--store "$previous/acts.zarr")
    fi
    read -ra extra <<<"$track_options"
    status=0
    "${xc[@]}" track add "$registry" "$pair/xc.safetensors" --releases "$a,$b" "${track_stores[@]}" \
        --device "$device" "${extra[@]}" -q >/dev/null || status=$?
    case $status in
        0) ;;
        3) watch=1 ;;  # xc track printed one line per watched feature
        *) exit "$status" ;;
    esac
    echo "$b" >"$state/tracked.tmp" && mv "$state/tracked.tmp" "$state/tracked"
    echo "$pair" >"$state/tracked_pair.tmp" && mv "$state/tracked_pair.tmp" "$state/tracked_pair"
    # The previous pair's store is no longer needed: the next pair is matched through this one.
    [ "$keep_store" = 1 ] || [ -z "$previous" ] || [ "$previous" = "$pair" ] || rm -rf "$previous/acts.zarr"
fi

# Count the classes, append the summary to the log, then mark the pair done with it.
"$python" - "$pair" "$a" "$b" "$threshold" "$before" "$after" "$watch" <<'PY'
import collections, datetime, json, sys
pair, a, b, threshold, before, after, watch = sys.argv[1:]
counts = collections.Counter(json.loads(line)["class"] for line in open(f"{pair}/latents.jsonl"))
summary = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "before": before, "after": after, "latents": sum(counts.values()),
           "exclusive_after": counts[f"exclusive:{b}"], "exclusive_before": counts[f"exclusive:{a}"],
           "shared": counts["shared"], "mixed": counts["mixed"], "dead": counts["dead"],
           "threshold": int(threshold), "alert": counts[f"exclusive:{b}"] > int(threshold),
           "crosscoder": f"{pair}/xc.safetensors", "classes": f"{pair}/latents.jsonl",
           "watch_alert": watch == "1"}
with open(f"{pair}/summary.json.tmp", "w") as f:
    json.dump(summary, f)
PY
# One write of one short line: appends from other writers cannot interleave with it. A run killed
# after the append and before the mv redoes the pair; its line is then in the log already.
line=$(cat "$pair/summary.json.tmp")
grep -qF "\"crosscoder\": \"$pair/xc.safetensors\"" "$log" 2>/dev/null || echo "$line" >>"$log"
mv "$pair/summary.json.tmp" "$pair/summary.json"
[ "$keep_store" = 1 ] || [ -n "$registry" ] || rm -rf "$pair/acts.zarr"

exclusive=$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["exclusive_after"])' "$pair/summary.json")
if [ "$watch" = 1 ]; then
    [ "$exclusive" -le "$threshold" ] || echo "cron_diff: $exclusive latents exclusive to $b (threshold $threshold): $pair/latents.jsonl" >&2
    exit 4
fi
if [ "$exclusive" -gt "$threshold" ]; then
    echo "cron_diff: $exclusive latents exclusive to $b (threshold $threshold): $pair/latents.jsonl" >&2
    exit 3
fi
say "$exclusive latents exclusive to $b (threshold $threshold)"
