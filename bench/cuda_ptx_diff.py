"""Whether two versions of runtime/cuda_int4.py compile to the same PTX for the variants both have, on a CPU.

A change to the kernel source that must leave the existing variants as they were (a new variant bit behind its
own `#if`, a helper moved, a refactor) can be checked without a GPU: NVRTC compiles each variant to PTX, and
identical PTX is identical code. Session 22 checked SUBX this way (416 variants of the plain kernel and the
fused ops, byte for byte the same as session 21's).

NVRTC comes from the `nvidia-cuda-nvrtc` wheel (`pip download --no-deps nvidia-cuda-nvrtc`, unzipped; no GPU or
driver needed):

    git show REV:lorafast_export/runtime/cuda_int4.py > /tmp/old.py
    python bench/cuda_ptx_diff.py /tmp/old.py lorafast_export/runtime/cuda_int4.py \
        --nvrtc /tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so.13
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import itertools
import sys


def _module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ptx(lib, src: str) -> str:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [b"--gpu-architecture=compute_90", b"-std=c++17"]
    if lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)):
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(log.value.decode()[:2000])
    n = ctypes.c_size_t()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.value.decode()


def _fused_defines(mod, op: str, gs: int, asym: int, adt: int, bits: int, bias: int) -> str:
    add_in, norm, glu, rope, add_out = mod._FLAGS[op]
    return mod._defines(gs, 8, 1, asym, 1, adt, 0, bits, True) + (
        f"#define ADD_IN {add_in}\n#define NORM {norm}\n#define GLU {glu}\n#define ROPE {rope}\n"
        f"#define BIAS {bias}\n#define ADD_OUT {add_out}\n#define D 128\n#define KNAME int4_mma_{op}\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--nvrtc", required=True, help="path of libnvrtc.so")
    p.add_argument("--bits", default="0,1", help="variant bits both versions have (comma-separated)")
    a = p.parse_args()
    lib = ctypes.CDLL(a.nvrtc)
    old, new = _module(a.old, "cuda_int4_old"), _module(a.new, "cuda_int4_new")
    bits_list = [int(b) for b in a.bits.split(",")]
    same, differ = 0, []
    plain = itertools.product(
        (32, 64, 128, 256), (0, 1), (0, 1), (0, 1, 2), bits_list, (4, 8), (1, 2), (0, 3)
    )
    for gs, asym, adt, sdt, bits, ksb, rpw, minb in plain:
        if sdt != 1 and (ksb, rpw, minb) != (8, 1, 0):  # the scale dtypes at one layout
            continue
        case = (gs, ksb, rpw, asym, sdt, adt, minb, bits, False)
        if _ptx(lib, old._defines(*case) + old.SOURCE) == _ptx(lib, new._defines(*case) + new.SOURCE):
            same += 1
        else:
            differ.append(("plain", *case))
    for op in (old.QKV_OP, old.O_OP, old.GLU_OP):
        for case in itertools.product((32, 128), (0, 1), (0, 1), bits_list, (0, 1)):
            srcs = [_ptx(lib, _fused_defines(m, op, *case) + m.SOURCE) for m in (old, new)]
            if srcs[0] == srcs[1]:
                same += 1
            else:
                differ.append((op, *case))
    for d in differ:
        print("differs:", d)
    print(f"{same} variants with identical PTX, {len(differ)} different")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
