"""How many bytes of the base checkpoint one build reads from its files, with and without the resident base
(validate/resident.py), on the CPU: the count the H200 pays for at ~1.1 GB/s through pageable memory.

    python scripts/make_model.py both /tmp/m --preset demo-like --device cpu
    LORAFAST_RESIDENT=0 python bench/validate_base_reads.py /tmp/m/base /tmp/m/lora /tmp/out-0
    LORAFAST_RESIDENT=1 python bench/validate_base_reads.py /tmp/m/base /tmp/m/lora /tmp/out-1
    python bench/validate_base_reads.py /tmp/m/base /tmp/m/lora /tmp/out-nv --no-validate

The build is `--quant rtn --target hf` (merges on read, like the 8B awq/gptq builds), with the streamed reference
forced (PEFT_REFERENCE_MAX_BYTES = 0: what an 8B model gets). Extra arguments go to `build`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lorafast_export.validate.resident as resident  # noqa: E402
import lorafast_export.validate.run as run  # noqa: E402
import lorafast_export.weights as weights  # noqa: E402
from lorafast_export.cli import main as cli_main  # noqa: E402


def main() -> None:
    base_dir, adapter, out = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3]
    run.PEFT_REFERENCE_MAX_BYTES = 0  # the streamed reference, as at 8B
    count = [0]
    store_get, resident_read = weights.WeightStore.get, resident.ResidentStore._read

    def get(self, name):  # every streamed read of a base tensor
        t = store_get(self, name)
        e = self._entries.get(name)
        if e is not None and e.path.parent == base_dir:
            count[0] += e.nbytes
        return t

    def read(self, name):  # the resident store's staged reads (they bypass WeightStore.get)
        span = self.store.span_of(name)
        if span is not None and span[0].parent == base_dir and span[2]:
            count[0] += span[2]
        return resident_read(self, name)

    weights.WeightStore.get, resident.ResidentStore._read = get, read
    t0 = time.perf_counter()
    args = ["build", "--base", str(base_dir), "--adapter", adapter, "--quant", "rtn", "--target", "hf"]
    try:
        cli_main([*args, "--out", out, "--force", "--no-cache", *sys.argv[4:]])
    except SystemExit:
        pass
    stored = sum(
        e.nbytes for e in weights.WeightStore(sorted(base_dir.glob("*.safetensors")))._entries.values()
    )
    print(
        f"LORAFAST_RESIDENT={os.environ.get('LORAFAST_RESIDENT')} {' '.join(sys.argv[4:])}: base bytes read "
        f"{count[0]} = {count[0] / stored:.2f} x stored ({stored}); wall {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
