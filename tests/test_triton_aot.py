"""Every generated Triton kernel compiles for the H100 (sm_90) on this machine, GPU or not.

CI has no GPU: compiling ahead of time with Triton's own LLVM and ptxas is what proves that a change to the
code generators does not break the GPU build (the interpreter that runs the kernels in the other tests
checks their values, not that Triton can compile them). It runs in a fresh process: Triton cannot compile
once its interpreter is on (tests/conftest.py turns it on where there is no GPU).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_kernel_kind_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EQUIKERN_CACHE_DIR"] = str(tmp_path)
    # uvu: several paths per output block and mul2 > 1 (x2 = 2x0e + 1o + 2e); uvw: fully connected,
    # with its convolution
    # (the CP kernels for L = 1, the spherical harmonics up to l = 2 and the unfused convolution's sum with
    # the first)
    for irreps, kinds, others in (
        ("8x0e+8x1o+4x2e;2x0e+1o+2e;0e+1o+2e+3o", 6 + 2 + 3 + 1, ["--cp", "1", "--sh", "2"]),
        ("3x0e+2x1o;0e+1o;4x0e+3x1o;uvw", 7, ["--cp", "", "--sh", "", "--no-segment-sum"]),
    ):
        out = tmp_path / "aot.json"
        cmd = [sys.executable, "-m", "equikern.triton.aot", "--irreps", irreps, *others]
        cmd += ["--dtypes", "float32,float64,bfloat16", "--json", str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        rows = json.loads(out.read_text())["rows"]
        assert len(rows) == 3 * kinds
        for r in rows:
            assert 0 < r["registers"] <= 255 and r["ptx_lines"] > 50, r
