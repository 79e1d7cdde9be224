"""Sweep the torch backend's shared-layout chunk rows and tile size on full-catalogue CE.

    python scripts/torch_backend_sweep.py --sizes 4096x50000 4096x100000 8192x50000 \
        --configs 256:1048576 512:1048576 --peers compiled_reference cce

Prints the median and best forward+backward time of each (rows, tile elements) configuration,
interleaving the configurations over two rounds so that drift of the machine hits all of them.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fastrecloss.backends import torch as tb
from fastrecloss.benchmark.harness import Case, _step, implementation, make_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["4096x50000", "4096x100000", "8192x50000"])
    parser.add_argument("--configs", nargs="+", default=["64:262144", "256:524288", "256:1048576", "512:1048576"],
                        help="MIN_GEMM_ROWS:TILE_ELEMENTS pairs")
    parser.add_argument("--peers", nargs="*", default=[], help="also time these implementations")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per configuration and round")
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs]
    for size in args.sizes:
        rows, items = (int(x) for x in size.split("x"))
        case = Case("softmax_ce", "catalogue", rows, items)
        x = make_inputs(case)
        fn = implementation(case, "torch")
        times: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
        for _ in range(2):
            for cfg in configs:
                tb.MIN_GEMM_ROWS, tb.TILE_ELEMENTS = cfg
                _step(fn, x, "fwdbwd")
                for _ in range(args.calls):
                    start = time.perf_counter()
                    _step(fn, x, "fwdbwd")
                    times[cfg].append(time.perf_counter() - start)
        for (gemm_rows, tile), ts in times.items():
            print(f"R={rows} I={items} rows={gemm_rows} tile={tile}: median {statistics.median(ts) * 1e3:.0f} ms, "
                  f"best {min(ts) * 1e3:.0f} ms", flush=True)
        for peer in args.peers:
            peer_fn = implementation(case, peer)
            _step(peer_fn, x, "fwdbwd")
            ts = []
            for _ in range(2 * args.calls):
                start = time.perf_counter()
                _step(peer_fn, x, "fwdbwd")
                ts.append(time.perf_counter() - start)
            print(f"R={rows} I={items} {peer}: median {statistics.median(ts) * 1e3:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
