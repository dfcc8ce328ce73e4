#!/bin/bash
# GPU sweep of toy teacher recipes with benchmarks/toy_recipe_probe.py (CPU-recipe search).
# Needs the wheels the device lacks in .whl/ (see README, "Teacher recipe sweep").
# Sweep 2: 2-D sin-cos vision position init vs random, batch size, lr, data mix, spec;
# budgets sized to the 2-core CPU build (~140K examples = 4400 steps of 32 for the teacher).
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/.whl/extra:$PWD/src PYTHONUNBUFFERED=1 TQDM_DISABLE=1
P="python3 benchmarks/toy_recipe_probe.py --device cuda --threads 1 --eval-every 1000"
TS=96,2,4,192,3,4,512
MIX="--lea 0.5 --write 0.25 --caption 0.15"
# build the token caches first
$P --steps 1 --skills color > $OUT/cache0.log 2>&1 &
$P --steps 1 --skills color --lea 0.5 > $OUT/cache1.log 2>&1 &
$P --steps 1 --skills color $MIX > $OUT/cache2.log 2>&1 &
wait
echo "caches built $(date +%T)"
run() { name=$1; shift; timeout 330 $P "$@" > $OUT/$name.log 2>&1 & }
run S1 --spec $TS --lr 3e-4 --steps 7000 --pos-std 2.0 --pos-init random
run S2 --spec $TS --lr 3e-4 --steps 7000 --pos-std 2.0 --pos-init sincos
run S3 --spec $TS --lr 3e-4 --steps 9000 --pos-std 2.0 --pos-init sincos --batch-size 16 --eval-every 2000
run S4 --spec $TS --lr 3e-4 --steps 7000 --pos-std 2.0 --pos-init sincos --lea 0.5
run S5 --spec $TS --lr 3e-4 --steps 7000 --pos-std 2.0 --pos-init sincos $MIX
run S6 --spec $TS --lr 5e-4 --steps 7000 --pos-std 2.0 --pos-init sincos
run S7 --spec $TS --lr 3e-4 --steps 7000 --pos-std 1.0 --pos-init sincos
run S8 --spec 96,2,4,160,3,4,384 --lr 3e-4 --steps 7000 --pos-std 2.0 --pos-init sincos
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
echo "done $(date +%T)"
for f in $OUT/S*.log; do echo "== $f"; grep -E "^spec|^step|Error" $f | sed 's/ToySpec(//' | cut -c1-220 | tail -12; done
