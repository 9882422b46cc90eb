#!/usr/bin/env bash
# The CUDA checks of this project in one go, for a machine with a GPU (docs/PERFORMANCE.md, CUDA):
# the test suite with CUDA visible, the benchmarks with --device cuda (bf16 autocast, the fused
# attention kernels), the GPU presets trained a few steps each exactly as configured, and a small
# experiment (worker processes sharing the GPU, hard-mode evaluation, the report).
#
#   bash benchmarks/cuda_check.sh OUT_DIR [NEOX_DATA_DIR]
#
# NEOX_DATA_DIR (default data/neox) is `ponderlm data prepare --tokenizer neox --out data/neox`.
# Every section has its own time limit (CHECK_TIME_SCALE=2 doubles them all), so one that hangs or
# fails does not stop the others; each writes its output to OUT_DIR and the summary lists what
# passed. On an H200 the sections that finished took 12-60 s each (docs/PERFORMANCE.md, CUDA).
set -u
out=${1:?usage: cuda_check.sh OUT_DIR [NEOX_DATA_DIR]}
data=${2:-data/neox}
mkdir -p "$out"
py=${PYTHON:-python3}
scale=${CHECK_TIME_SCALE:-1}
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
: >"$summary"

section() {  # section NAME SECONDS COMMAND...: run it with a time limit, log to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$summary"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    nproc
} >"$out/env.txt" 2>&1

# 1. the test suite, CUDA visible (device "auto" picks it in every test that does not force CPU)
xdist=()
$py -c "import xdist" 2>/dev/null && xdist=(-n 8)
section pytest $((600 * scale)) $py -m pytest -q -rf --maxfail=25 -p no:cacheprovider "${xdist[@]}" tests

# 2. benchmarks on the GPU (bf16 autocast by default on CUDA), Pythia-70m-like and cpu_text sizes
section train_step $((120 * scale)) $py benchmarks/train_step.py --device cuda --d-model 512 --layers 6 --heads 8 \
    --d-ff 1376 --vocab 50304 --K 3 --seq-len 512 --batch 16 --out "$out/train_step.json"
section train_speed $((120 * scale)) $py benchmarks/train_speed.py --device cuda --d-model 128 --layers 4 --heads 4 \
    --d-ff 344 --vocab 1024 --K 3 --seq-len 256 --batch 8 --out "$out/train_speed.json"
section attention $((300 * scale)) $py benchmarks/attention.py --device cuda --backward --out "$out/attention.json"
section inference $((300 * scale)) $py benchmarks/inference.py --device cuda --out "$out/inference.json"

# 3. the GPU presets, every run as configured, a few steps each (batch capped, projection rescaled)
section smoke_70m $((300 * scale)) $py benchmarks/preset_smoke.py --config configs/experiments/gpu_70m.yaml --data "$data" \
    --steps 5 --out "$out/smoke_70m.json"
section smoke_410m $((300 * scale)) $py benchmarks/preset_smoke.py --config configs/experiments/gpu_410m.yaml --data "$data" \
    --runs vanilla vanilla-l72 p2-k3 p3-k3-l0.05 --steps 4 --max-batch 4 --out "$out/smoke_410m.json"

# 4. a small experiment of cpu_text.yaml's runs on the GPU: workers, evaluation, test split, report
exp=$(mktemp -d)
$py - "$exp" "$data" <<'EOF'
import sys, yaml
exp, data = sys.argv[1:]
raw = yaml.safe_load(open("configs/experiments/cpu_text.yaml"))
raw["out_dir"] = f"{exp}/runs"
raw["base"]["train"].update(data_dir=data, max_steps=20, ckpt_interval=0, log_interval=5, progress=False)
raw["runs"] = [r for r in raw["runs"] if r["name"] in ("vanilla", "p2-k1", "p3-k3-l0.05")]
raw["runs"][0]["seeds"] = [0, 1]
for r in raw["runs"][1:]:
    r.pop("seeds", None)
raw["eval_windows"] = 8
yaml.safe_dump(raw, open(f"{exp}/exp.yaml", "w"), sort_keys=False)
EOF
section experiment $((300 * scale)) $py -m ponderlm experiment pareto --config "$exp/exp.yaml" --jobs 3
cp "$exp/runs/pareto.md" "$out/experiment_pareto.md" 2>/dev/null
echo "done" >>"$summary"
