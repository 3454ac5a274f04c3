for round in 1 2; do
for tree in base main; do
  cd /work/$tree
  o=/tmp/ab/$tree-$round
  mkdir -p $o
  PYTHONPATH=/work/$tree python benchmarks/bench_gating.py --quick --min-run-time 0.1 --out $o/gating.json > $o/gating.log 2>&1
  PYTHONPATH=/work/$tree python benchmarks/bench_moe.py --rounds 5 --out $o/moe.json > $o/moe.log 2>&1
  PYTHONPATH=/work/$tree python benchmarks/bench_mars.py --rounds 3 --out $o/mars.json > $o/mars.log 2>&1
done
done
echo done
