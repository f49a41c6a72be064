"""benchmarks/bench_uniba.py runs end to end on the CPU: the memory table in its own process (the
fixed mmap threshold), then the matmul share with both allocators. Tiny sizes: a check that the
script works and what it prints, not a measurement."""
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_share_and_table_on_cpu():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("INFDIT_BENCH_TABLE_ONLY", None)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_uniba.py"), "--sizes", "256x128",
                             "--share-size", "128x128", "--share-layers", "1", "--share-repeat", "2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    shares = re.findall(r"allocator: (glibc default|freed memory kept); medians of 2 calls", out)
    assert shares == ["glibc default", "freed memory kept"], out
    rows = re.findall(r"^ +(sweep bb=1|auto =\d+) +([\d.]+) +[\d.]+ +[\d.]+ +[\d.]+ +(\d+)% +(\d+)%-(\d+)%$", out, re.M)
    assert len(rows) == 4, out
    for _, gflop, share, low, high in rows:
        # One 128-px block of one released-width layer: the QKV, out and MLP products (40.3 GFLOP),
        # the neighbour attention (21.5), the LR cross-attention (33.9) and the patch embeddings.
        assert 95 < float(gflop) < 97
        assert 0 < int(low) <= int(share) <= int(high) < 200
    # The table ran after the share part (in the re-run process) and holds its size.
    table = re.search(r"^ +256x128 +2 +whole image", out, re.M)
    assert table and out.index("freed memory kept") < table.start(), out
