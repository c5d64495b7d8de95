"""Real write failures (issue 16, item 12): a full disk, a file-size limit, an output on a kernel pseudo file
system. Each exits 2 naming the file and the reason, and leaves no partial directory behind.

The failures are real, not simulated: RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG; Python
ignores SIGXFSZ), and a 48 KiB tmpfs mounted in a user namespace runs out of space (ENOSPC).
"""

import os
import resource
import shutil
import subprocess
import sys

import pytest

from tests.tiny import save_base_and_adapter


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    save_base_and_adapter(root, target_modules=["q_proj", "v_proj"])
    return root


def cli(args, preexec_fn=None, prefix=(), env=None):
    return subprocess.run(
        [*prefix, sys.executable, "-m", "lorafast_export.cli", *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=preexec_fn,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def build_args(inputs, out, *extra):
    return [
        "build",
        "--base",
        inputs / "base",
        "--adapter",
        inputs / "ad",
        "--no-validate",
        "--out",
        out,
        *extra,
    ]


def assert_refused(r, *expect):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    for e in expect:
        assert e in r.stderr.replace("\n", " "), (e, r.stderr)


@pytest.mark.parametrize("quant", ["none", "rtn"])
def test_file_size_limit(inputs, tmp_path, quant):
    """The merged shard (about 90 KB) is larger than the limit: safetensors' writer fails with EFBIG."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    out = tmp_path / "o"
    r = cli(
        build_args(inputs, out, "--quant", quant),
        preexec_fn=limit,
        env={"LORAFAST_CACHE": str(tmp_path / "c")},
    )
    assert_refused(r, "file-size limit", "EFBIG", ".safetensors", "Nothing was published")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"], "no partial output left"


def _can_mount_tmpfs(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(
        ["unshare", "-Urm", "mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(d)], capture_output=True
    )
    d.rmdir()
    return r.returncode == 0


@pytest.mark.parametrize("where", ["out", "cache"])
def test_disk_full(inputs, tmp_path, where):
    """A real ENOSPC on a small tmpfs, for the artifact or for the stage cache."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "o" if where == "out" else tmp_path / "o"
    cache = tmp_path / "c" if where == "out" else mnt / "cache"
    script = (
        f"mount -t tmpfs -o size=48k tmpfs {mnt} && "
        + " ".join(
            f"'{a}'"
            for a in [sys.executable, "-m", "lorafast_export.cli", *map(str, build_args(inputs, out))]
        )
        + f"; rc=$?; ls -A {mnt} > {tmp_path / 'left.txt'}; exit $rc"
    )
    r = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LORAFAST_CACHE": str(cache)},
    )
    assert_refused(r, "no space left on", str(mnt))
    left = (tmp_path / "left.txt").read_text().split()
    assert left in ([], ["cache"]), left  # nothing of the artifact; the cache keeps no partial entry
    assert not out.exists()


@pytest.mark.parametrize("out", ["/proc/lorafast-out", "/sys/kernel/lorafast-out", "/proc/self/x"])
def test_output_on_a_pseudo_file_system(inputs, out):
    r = cli(build_args(inputs, out))
    assert_refused(r, "output.dir", "kernel pseudo file system")
