"""Print the kd_loss benchmark table (markdown) from a pytest-benchmark JSON file.

    python benchmarks/report.py results.json
"""
import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        runs = json.load(f)["benchmarks"]
    cases = defaultdict(dict)
    device = ""
    for run in runs:
        info = run["extra_info"]
        if "provider" not in info:
            continue
        device = info["device"]
        cases[(info["shape"], info["dtype"])][info["provider"]] = (run["stats"]["median"], info)
    print(f"kd_loss forward+backward on {device} (median of rounds)\n")
    print("| shape | dtype | provider | median ms | useful GB/s | vs eager | vs compile | peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for (shape, dtype), by_provider in cases.items():
        eager = by_provider.get("torch_eager", (None,))[0]
        compiled = by_provider.get("torch_compile", (None,))[0]
        for provider, (median, info) in by_provider.items():
            gbs = info["useful_bytes"] / median / 1e9
            vs_eager = f"{eager / median:.2f}×" if eager else "n/a"
            vs_compile = f"{compiled / median:.2f}×" if compiled else "n/a"
            peak = info.get("peak_extra_bytes")
            peak_text = f"{peak / 2**20:.0f}" if peak is not None else "n/a"
            print(f"| {shape} | {dtype} | {provider} | {median * 1e3:.3f} | {gbs:.1f} | {vs_eager} | {vs_compile} "
                  f"| {peak_text} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py RESULTS.json")
    main(sys.argv[1])
