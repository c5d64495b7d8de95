# Session 18 call G (the session's last device time): the mixed first prefill is sometimes ~10-13 ms late with its
# host launch ~10 ms longer (calls C, D, F), at random passes. Python's collector? The mixed queue, then gcwatch:
# passes with every collection recorded, then the same after gc.collect() + gc.freeze().
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed,gcwatch --gc-passes 10 --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --out $OUT/gcwatch.json > $OUT/gcwatch.log 2>&1
echo "gcwatch rc $? at ${SECONDS}s"; grep -E "mixed (first|default)|gcwatch (default|frozen)|rror" $OUT/gcwatch.log | cut -c1-330
python3 -c "
import json,sys
d=json.load(open(sys.argv[1])).get('gcwatch',{})
print('objects', d.get('objects_tracked'), 'frozen', d.get('frozen_objects'))
for arm in ('default','frozen'):
    for r in d.get(arm,[]): print(arm, r)
" $OUT/gcwatch.json
