# Sourced by a device script (bench/results/h200-s*-call*.sh) first: strict variables, unbuffered Python, the
# carried wheels (.whl: pydantic and its deps, missing on the device) on the path, and the commit it runs.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null || return 3
export PYTHONPATH=/tmp/site:$PWD
echo "main $(cat .devq/commit) + the working tree"
