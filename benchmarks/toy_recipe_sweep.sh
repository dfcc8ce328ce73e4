#!/bin/bash
# GPU sweep of toy teacher recipes with benchmarks/toy_recipe_probe.py (CPU-recipe search).
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/.whl/extra:$PWD/src PYTHONUNBUFFERED=1 TQDM_DISABLE=1
P="python3 benchmarks/toy_recipe_probe.py --device cuda --threads 1 --eval-every 1000"
T=teacher; TS=96,2,4,192,3,4,512
# build the two token caches first (CQM-A only; half CQM-LEA)
$P --steps 1 --skills color > $OUT/cache0.log 2>&1 &
$P --steps 1 --skills color --lea 0.5 > $OUT/cache1.log 2>&1 &
wait
echo "caches built $(date +%T)"
run() { name=$1; shift; timeout 390 $P "$@" > $OUT/$name.log 2>&1 & }
run G1 --spec $TS --lr 1e-3 --steps 10000
run G2 --spec $TS --lr 1e-3 --steps 10000 --pos-std 2.0
run G3 --spec $TS --lr 3e-4 --steps 10000 --pos-std 2.0
run G4 --spec 64,2,4,128,4,4,384 --lr 1e-3 --steps 10000 --pos-std 2.0
run G5 --spec 32,1,2,56,2,2,112 --lr 1e-3 --steps 10000 --pos-std 2.0
run G6 --spec $TS --lr 1e-3 --steps 10000 --pos-std 2.0 --aux 0.3
run G7 --spec $TS --lr 1e-3 --steps 10000 --pos-std 2.0 --lea 0.5
run G8 --spec 48,2,4,96,3,4,256 --lr 1e-3 --steps 10000 --pos-std 2.0
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
echo "done $(date +%T)"
for f in $OUT/G*.log; do echo "== $f"; grep -E "^spec|^step" $f | sed 's/ToySpec(//' | cut -c1-220 | tail -12; done
