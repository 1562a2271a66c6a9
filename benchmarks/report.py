"""Print the benchmark tables (markdown) from a pytest-benchmark JSON file: kd_loss, then the training step.

    python benchmarks/report.py results.json
"""
import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        runs = json.load(f)["benchmarks"]
    kd_loss_table([r for r in runs if "provider" in r["extra_info"]])
    step_table([r for r in runs if "variant" in r["extra_info"]])
    loader_table([r for r in runs if "loader" in r["extra_info"]])


def kd_loss_table(runs: list) -> None:
    if not runs:
        return
    cases = defaultdict(dict)
    device = ""
    for run in runs:
        info = run["extra_info"]
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


def step_table(runs: list) -> None:
    if not runs:
        return
    info0 = runs[0]["extra_info"]
    print(f"\nspaced KD training step ({info0['model']}, batch {info0['batch']}) on {info0['device']}\n")
    print("| variant | median ms per round | images/s | vs eager |")
    print("|---|---|---|---|")
    medians = {r["extra_info"]["variant"]: r["stats"]["median"] for r in runs}
    for run in runs:
        info, median = run["extra_info"], run["stats"]["median"]
        eager = medians.get("eager")
        ratio = f"{eager / median:.2f}×" if eager else "n/a"
        print(f"| {info['variant']} | {median * 1e3:.1f} | {info['images_per_round'] / median:.0f} | {ratio} |")


def loader_table(runs: list) -> None:
    if not runs:
        return
    print(f"\ntraining loader, Tiny-ImageNet shape (64×64 JPEG, batch 128) on {runs[0]['extra_info']['device']}\n")
    print("| loader | median s per epoch | images/s | vs torch DataLoader |")
    print("|---|---|---|---|")
    medians = {r["extra_info"]["loader"]: r["stats"]["median"] for r in runs}
    for run in runs:
        info, median = run["extra_info"], run["stats"]["median"]
        baseline = medians.get("torch")
        ratio = f"{baseline / median:.2f}×" if baseline else "n/a"
        print(f"| {info['loader']} | {median:.2f} | {info['images_per_round'] / median:.0f} | {ratio} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py RESULTS.json")
    main(sys.argv[1])
