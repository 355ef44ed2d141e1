#!/usr/bin/env bash
# mcpipe's CUDA paths, checked end to end in one script, with throughput figures and ratios.
#
#     bash bench/gpu_check.sh [--device cuda|cpu] [--python PATH] [--dir DIR] [--keep] [--nproc G]
#
# On a CUDA machine (the default, --device cuda) it runs every stage the way a
# user would and prints one line per step:
#
#   1. extract     seeded JPEGs (imagefolder layout) through `mcpipe extract`, ResNet50
#                  random init: bf16 autocast, channels_last, pinned host copies, decoding workers;
#                  the store is then opened (and validated) by `mcpipe inspect`;
#   2. train-head  one epoch at Food-101N's size (a synthetic store of 310,000 x 2048, 101 classes),
#                  train.auto=false, features on the device;
#   3. finetune    bench/finetune_speed.py: one epoch of `mcpipe finetune` (N = 4) against a plain
#                  torchvision loop (fp32, NCHW, pageable memory), images/s and the ratio;
#   4. torchrun    `mcpipe finetune` under torchrun (--nproc G processes, default 1) on the step-1
#                  images against one plain process with the same settings, images/s and the ratio;
#                  which process group mcpipe joined (nccl on CUDA, gloo on CPU; with one process it
#                  joins none), and, when it joined none, a torchrun check of that backend itself
#                  (init_process_group, all_reduce, one DistributedDataParallel step).
#
# --device cpu runs the same steps at small sizes, one thread per process (OMP_NUM_THREADS=1 unless set),
# in about a minute on 2 cores (tests/test_gpu_check.py keeps it from rotting); its figures are no benchmark.
# --python: the interpreter with mcpipe installed (default .venv/bin/python, else python3).
# --dir: where the work folder (mktemp -d) is made (default $TMPDIR or /tmp); it is removed at
# the end unless --keep, and kept, with every step's log, when a step fails.
# Exit status 0 only when every step passed; otherwise one line names the failed step.

set -euo pipefail

DEVICE=cuda
PY=""
PARENT=""
KEEP=0
NPROC=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "gpu_check: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --device) [ $# -ge 2 ] || die "--device needs a value (cuda or cpu)"; DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs a path"; PY="$2"; shift 2 ;;
        --python=*) PY="${1#*=}"; shift ;;
        --dir) [ $# -ge 2 ] || die "--dir needs a folder"; PARENT="$2"; shift 2 ;;
        --dir=*) PARENT="${1#*=}"; shift ;;
        --nproc) [ $# -ge 2 ] || die "--nproc needs a number"; NPROC="$2"; shift 2 ;;
        --nproc=*) NPROC="${1#*=}"; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (usage: bash bench/gpu_check.sh [--device cuda|cpu] [--python PATH] [--dir DIR] [--keep] [--nproc G])" ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) die "--device must be cuda or cpu, not '$DEVICE'" ;; esac
case "$NPROC" in ''|*[!0-9]*|0) die "--nproc must be an integer >= 1, not '$NPROC'" ;; esac
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found (--python PATH)"
if [ "$DEVICE" = cpu ]; then
    # a smoke check, not a benchmark: one thread per process unless asked otherwise; on a shared 2-core
    # machine two OpenMP threads per process run several times slower than one
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

# one interpreter start for all the checks before any work: mcpipe and torch import, CUDA is there
ABOUT="$("$PY" - "$DEVICE" 2>&1 <<'PYEOF'
import sys
try:
    import mcpipe, torch
except Exception as exc:
    sys.exit(f"cannot import mcpipe and torch: {exc}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    name = torch.cuda.get_device_name()
else:
    name = "cpu"
print(f"{name}\ttorch {torch.__version__}, {torch.get_num_threads()} threads")
PYEOF
)" || {
    case "$ABOUT" in
        *"cannot import"*) die "$(printf '%s\n' "$ABOUT" | tail -n 1) ($PY; --python PATH: the interpreter mcpipe is installed for)" ;;
        *) die "--device $DEVICE: $(printf '%s\n' "$ABOUT" | tail -n 1) ($PY); use --device cpu" ;;
    esac
}
ABOUT="$(printf '%s\n' "$ABOUT" | tail -n 1)"  # after any warning torch printed
DEVICE_NAME="${ABOUT%%$'\t'*}"
TORCH_INFO="${ABOUT#*$'\t'}"

if [ -n "$PARENT" ]; then mkdir -p "$PARENT" || die "cannot create --dir $PARENT"; fi
WORK="$(mktemp -d "${PARENT:-${TMPDIR:-/tmp}}/gpu_check.XXXXXX")"
STEP="0 (setup)"
LOG=""
TOTAL=4

on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        if [ -n "$STEP" ]; then
            echo "gpu_check: step $STEP FAILED (exit $rc) on $DEVICE; work folder kept: $WORK" >&2
            if [ -n "$LOG" ] && [ -s "$LOG" ]; then
                echo "--- last lines of $LOG:" >&2
                tail -n 25 "$LOG" >&2
            fi
        fi
    elif [ "$KEEP" -eq 0 ]; then
        rm -rf -- "$WORK"
    else
        echo "gpu_check: work folder kept: $WORK"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# fail MESSAGE: a check inside a step did not hold
fail() { echo "gpu_check: $STEP: $*" >&2; exit 1; }

# logged NAME CMD...: run CMD with its output in $WORK/NAME.log (shown if it fails)
logged() {
    LOG="$WORK/$1.log"
    shift
    "$@" >"$LOG" 2>&1
}

cat >"$WORK/helper.py" <<'PYEOF'
"""gpu_check.sh's helpers: write the data, read the runs, format the lines."""

import json
import os
import re
import sys
from multiprocessing import Pool
from pathlib import Path


def _image(job):
    import numpy as np
    from PIL import Image

    path, seed, label, classes, size = job
    rng = np.random.default_rng([0, seed])
    small = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    small[..., label % 3] = 0.5 * small[..., label % 3] + 255 * 0.5 * (label + 1) / classes  # a class tint
    img = Image.fromarray(small.astype(np.uint8)).resize((size, size), Image.BICUBIC)
    noise = rng.integers(-12, 13, (size, size, 3))
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def images(root, n, classes, size):
    """root/train/c<k>/<i>.jpg: n seeded JPEGs, size x size, round-robin over the classes."""
    root, n, classes, size = Path(root), int(n), int(classes), int(size)
    jobs = []
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"{i:06d}.jpg"), i, i % classes, classes, size))
    procs = min(8, len(os.sched_getaffinity(0)))
    if n >= 1000 and procs > 1:
        with Pool(procs) as pool:
            pool.map(_image, jobs, chunksize=64)
    else:
        for j in jobs:
            _image(j)


def store(path, rows, dim, classes):
    from mcpipe.store.synthetic import write_synthetic_store

    write_synthetic_store(path, int(rows), int(dim), int(classes))


def _positive(value, what):
    if not value > 0:
        raise SystemExit(f"{what} is {value!r}, not a positive number")
    return value


def extract_line(log, inspect_json, device, workers):
    text = Path(log).read_text()
    m = re.search(r"^train: ([\d,]+) rows .*?; ([\d,]+) extracted in ([\d.]+) s \(([\d,.]+) img/s\); (\d+) skipped",
                  text, re.M)
    if not m:
        raise SystemExit(f"no 'train: ... img/s' summary line in the output of mcpipe extract ({log})")
    rows, extracted, rate, skipped = int(m[1].replace(",", "")), int(m[2].replace(",", "")), \
        float(m[4].replace(",", "")), int(m[5])
    s = json.loads(Path(inspect_json).read_text())
    p = s["provenance"]
    want = "bf16" if device == "cuda" else "fp32"
    if p["precision"] != want or not str(p["device"]).startswith(device):
        raise SystemExit(f"the store says {p['precision']} on {p['device']}, expected {want} on {device}")
    if skipped or extracted != rows or not s["complete"]:
        raise SystemExit(f"{extracted} of {rows} images extracted, {skipped} skipped, complete: {s['complete']}")
    _positive(rate, "extract img/s")
    print(f"extract: {rows:,} images, {rate:,.1f} img/s ({p['backbone']} random init, {p['image_size']} px, "
          f"{s['feature_dim']}-d {s['dtype']}; {p['precision']} on {p['device']}, {workers} decoding workers)")


def head_line(metrics, rows, dim, classes, device):
    m = json.loads(Path(metrics).read_text())
    h = m["history"]
    if len(h) != 1:
        raise SystemExit(f"{metrics}: {len(h)} epochs in history, expected 1")
    rate = _positive(h[0]["images_per_second"], "train-head img/s")
    epoch_s = int(rows) * 0.9 / rate  # the fit rows (val_fraction 0.1 held out), about
    print(f"train-head: {int(rows):,} x {dim} features, {classes} classes, one epoch {rate:,.0f} img/s "
          f"(~{epoch_s:.1f} s), whole command {m['seconds']:.1f} s (kNN graph, scores) on {device}")


def finetune_line(log, device):
    lines = [line for line in Path(log).read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON result line in the output of bench/finetune_speed.py ({log})")
    r = json.loads(lines[-1])
    a, b = _positive(r["a"], "mcpipe finetune img/s"), _positive(r["b"], "plain loop img/s")
    how = ("a: bf16 autocast, channels_last, pinned memory; b: fp32, NCHW, pageable" if device == "cuda"
           else "both fp32 on cpu")
    print(f"finetune: mcpipe N = 4 {a:,.1f} img/s, plain torchvision loop {b:,.1f} img/s, a/b = {a / b:.2f} ({how})")


def torchrun_line(ddp_metrics, single_metrics, ddp_log, nproc, device, backend, raw):
    def rate(path):
        m = json.loads(Path(path).read_text())
        if [x["phase"] for x in m["history"]] != ["cleaner"]:
            raise SystemExit(f"{path}: history {m['history']}, expected one cleaner epoch")
        return _positive(m["history"][0]["images_per_second"], f"images/s in {path}")

    a, b = rate(ddp_metrics), rate(single_metrics)
    joined = re.findall(r"rank \d+ of \d+ joined the (\w+) process group", Path(ddp_log).read_text())
    if int(nproc) > 1 and (len(joined) != int(nproc) or set(joined) != {backend}):
        raise SystemExit(f"expected {nproc} ranks to join a {backend} process group, the log says {joined}")
    group = (f"{len(joined)} ranks in a {backend} process group, DistributedDataParallel" if joined else
             f"mcpipe joined no process group at 1 process (WORLD_SIZE=1: no DDP, no {backend}); "
             f"{backend} checked directly: {raw}")
    print(f"torchrun: {nproc} process{'es' if int(nproc) > 1 else ''} {a:,.1f} img/s, one plain process "
          f"{b:,.1f} img/s, ratio {a / b:.2f} on {device}; {group}")


def raw_ddp(device):
    """Under torchrun: the backend mcpipe uses on this device, one all_reduce and one DDP step."""
    import datetime

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = torch.device(f"cuda:{local}" if device == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=5))
    try:
        t = torch.full((4,), float(rank + 1), device=dev)
        dist.all_reduce(t)
        assert t.tolist() == [world * (world + 1) / 2] * 4, t
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).to(dev)
        if dev.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        x = torch.randn(8, 3, 16, 16).pin_memory() if dev.type == "cuda" else torch.randn(8, 3, 16, 16)
        x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x), torch.arange(8, device=dev) % 4)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss).item()
        if rank == 0:
            print(f"{backend} all_reduce + DistributedDataParallel step ok ({world} process{'es' if world > 1 else ''})")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
PYEOF

helper() { "$PY" "$WORK/helper.py" "$@"; }

# sizes: on cuda those the check is meant for (the head at Food-101N scale), on cpu small enough for the tests
if [ "$DEVICE" = cuda ]; then
    N_IMAGES=4000; CLASSES=32; IMG_SIDE=256; SIZE=224; WORKERS=8; EX_BATCH=128
    HEAD_ROWS=310000; HEAD_DIM=2048; HEAD_CLASSES=101
    FS_ARGS=(--images 4096 --size 224 --batch 128 --workers 8 --rounds 2)
    FT_BATCH=128
    BACKEND=nccl
else
    N_IMAGES=48; CLASSES=4; IMG_SIDE=48; SIZE=32; WORKERS=2; EX_BATCH=16
    HEAD_ROWS=4000; HEAD_DIM=256; HEAD_CLASSES=10
    FS_ARGS=(--images 64 --size 32 --batch 16 --workers 2 --rounds 1)
    FT_BATCH=8
    BACKEND=gloo
fi
: >"$WORK/empty.toml"  # defaults plus the --set keys below, whatever ./pipeline.toml says
MC=("$PY" -m mcpipe)
COMMON=(--config "$WORK/empty.toml" --no-progress)
IMAGES="$WORK/images"

echo "gpu_check: device $DEVICE ($DEVICE_NAME), $TORCH_INFO, work folder $WORK"

# ---- 1. extract
STEP="1 (extract)"
LOG=""
helper images "$IMAGES" "$N_IMAGES" "$CLASSES" "$IMG_SIDE" || fail "writing $N_IMAGES JPEG images failed"
logged extract "${MC[@]}" extract "${COMMON[@]}" --out "$WORK/features" \
    --set data.source=imagefolder --set "data.root=$IMAGES" --set extract.backbone=resnet50 \
    --set extract.weights=none --set "extract.image_size=$SIZE" --set "extract.batch_size=$EX_BATCH" \
    --set "extract.num_workers=$WORKERS" --set "extract.device=$DEVICE"
LOG="$WORK/inspect.log"
"${MC[@]}" inspect --json "$WORK/features/train.h5" >"$WORK/inspect.json" 2>"$LOG"
LOG="$WORK/extract.log"
helper extract_line "$WORK/extract.log" "$WORK/inspect.json" "$DEVICE" "$WORKERS"

# ---- 2. train-head
STEP="2 (train-head)"
LOG=""
mkdir -p "$WORK/head_features"
helper store "$WORK/head_features/train.h5" "$HEAD_ROWS" "$HEAD_DIM" "$HEAD_CLASSES" ||
    fail "writing the synthetic store failed"
logged train_head "${MC[@]}" train-head "${COMMON[@]}" --features "$WORK/head_features" --out "$WORK/head" \
    --set train.auto=false --set train.epochs=1 --set "train.device=$DEVICE"
helper head_line "$WORK/head/metrics.json" "$HEAD_ROWS" "$HEAD_DIM" "$HEAD_CLASSES" "$DEVICE"

# ---- 3. finetune against a plain torchvision loop
STEP="3 (finetune)"
logged finetune_speed "$PY" "$REPO/bench/finetune_speed.py" --device "$DEVICE" --dir "$WORK/finetune_speed" "${FS_ARGS[@]}"
helper finetune_line "$LOG" "$DEVICE"

# ---- 4. finetune under torchrun against one plain process, same settings
STEP="4 (torchrun)"
FT_SET=(--set data.source=imagefolder --set "data.root=$IMAGES" --set extract.backbone=resnet50
        --set extract.weights=none --set "extract.image_size=$SIZE" --set finetune.epochs=1
        --set "finetune.batch_size=$FT_BATCH" --set "finetune.workers=$WORKERS" --set "finetune.device=$DEVICE")
logged torchrun "$PY" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC" \
    -m mcpipe finetune "${COMMON[@]}" --out "$WORK/ft_torchrun" "${FT_SET[@]}"
DDP_LOG="$LOG"
logged finetune_single "${MC[@]}" finetune "${COMMON[@]}" --out "$WORK/ft_single" "${FT_SET[@]}"
RAW="-"
if ! grep -q "joined the .* process group" "$DDP_LOG"; then
    logged raw_ddp "$PY" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC" "$WORK/helper.py" raw_ddp "$DEVICE"
    RAW="$(grep -m1 "step ok" "$LOG")" || fail "no 'step ok' line from the direct $BACKEND check"
fi
helper torchrun_line "$WORK/ft_torchrun/metrics.json" "$WORK/ft_single/metrics.json" "$DDP_LOG" "$NPROC" \
    "$DEVICE" "$BACKEND" "$RAW"

STEP=""
echo "gpu_check: all $TOTAL steps passed on $DEVICE_NAME"
