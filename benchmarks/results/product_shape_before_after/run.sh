# Issue "kernel library first": every benchmark before (0af3990, the tree the issue was filed on) and after
# (main), interleaved: base, main, base, main. Each tree runs in its own virtual environment with its own
# in-place build. Usage: bash run.sh BASE_TREE BASE_VENV MAIN_TREE MAIN_VENV OUT
set -u
base=$1; base_venv=$2; main=$3; main_venv=$4; out=$5
for round in 1 2; do
for tree in base main; do
  if [ $tree = base ]; then src=$base; venv=$base_venv; else src=$main; venv=$main_venv; fi
  o=$out/$tree-$round
  mkdir -p $o
  cd $src
  . $venv/bin/activate
  lscpu | grep -E "Model name|Flags" > $o/cpu.txt
  python benchmarks/bench_gating.py --quick --min-run-time 0.1 --out $o/gating.json > $o/gating.log 2>&1
  python benchmarks/bench_moe.py --rounds 5 --out $o/moe.json > $o/moe.log 2>&1
  python benchmarks/bench_mars.py --rounds 3 --out $o/mars.json > $o/mars.log 2>&1
  python benchmarks/bench_hf_experts.py --shapes qwen3 mixtral --rounds 3 --out $o/hf_experts.json > $o/hf_experts.log 2>&1
  python benchmarks/bench_mce.py --rounds 5 --out $o/mce.json > $o/mce.log 2>&1
  python benchmarks/bench_moe_retriever.py --rounds 5 --out $o/moe_retriever.json > $o/moe_retriever.log 2>&1
  deactivate
done
done
echo done
