"""Block until the host is idle, so a benchmark does not share the cores with other work.

    python benchmarks/wait_for_quiet.py [--busy 0.15] [--window 10] [--timeout 1800]

Idle means: over `window` seconds, less than `busy` of the host's CPU time was used (by anyone).
Exits 0 when idle, 1 on timeout (the caller may run anyway and report the measured load).
"""
import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flax_bert.bench import host_cpu_jiffies  # noqa: E402  (stdlib only: starts no framework)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--busy", type=float, default=0.15)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        busy0, total0 = host_cpu_jiffies()
        time.sleep(args.window)
        busy1, total1 = host_cpu_jiffies()
        load = (busy1 - busy0) / max(total1 - total0, 1)
        if load < args.busy:
            print(f"host idle ({load:.0%} busy over {args.window:.0f} s)", file=sys.stderr)
            return 0
    print(f"host still busy after {args.timeout:.0f} s; running anyway", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
