set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
S=$(date +%s)
(export PYTHONPATH=$PWD:/tmp/site; timeout 50 python3 -m pytest -q -s -p no:cacheprovider -rfE tests/test_graph.py -k "replay or padding or capturable" > $OUT/graph.log 2>&1; grep -E "worst|passed|failed|Error" $OUT/graph.log | cut -c1-300)
echo "graph tests $(( $(date +%s) - S )) s"
(export PYTHONPATH=$PWD:/tmp/site CLIPFAST_COMMIT=$NEW; timeout 75 python3 bench/throughput.py --points B/16:112:16 L/16:96:8 --no-cuda-graph --out /tmp/new --time-budget 45 > $OUT/new.log 2>&1; cp /tmp/new/throughput.md $OUT/new.md; tail -n 9 $OUT/new.log | cut -c1-330)
echo "new $(( $(date +%s) - S )) s"
(cd .old && export PYTHONPATH=$PWD:/tmp/site CLIPFAST_COMMIT=efae470; timeout 55 python3 bench/throughput.py --points B/16:112:16 L/16:96:8 --no-cuda-graph --no-open-clip --out /tmp/old --time-budget 25 > $OUT/old.log 2>&1; cp /tmp/old/throughput.md $OUT/old.md; tail -n 8 $OUT/old.log | cut -c1-250)
echo "old $(( $(date +%s) - S )) s"
(export PYTHONPATH=$PWD:/tmp/site CLIPFAST_COMMIT=$NEW; timeout 35 python3 bench/profile_step.py --out /tmp/prof > $OUT/prof.log 2>&1; cp /tmp/prof/profile.md $OUT/; grep -A12 "### clipfast" /tmp/prof/profile.md | head -14)
echo "total $(( $(date +%s) - S )) s"
