"""Print the benchmark tables (markdown) from a pytest-benchmark JSON file: kd_loss, kd_loss_linear, the training step.

    python benchmarks/report.py results.json
"""
import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        runs = json.load(f)["benchmarks"]
    kd_loss_table([r for r in runs if "provider" in r["extra_info"]])
    linear_table([r for r in runs if "linear_provider" in r["extra_info"]])
    steps = [r for r in runs if "variant" in r["extra_info"]]
    if steps:
        info = steps[0]["extra_info"]
        throughput_table(steps, f"spaced KD training step ({info['model']}, batch {info['batch']})", "variant",
                         "eager-fp32-nchw")
    overhead_table([r for r in runs if "loop" in r["extra_info"]])
    throughput_table([r for r in runs if "loader" in r["extra_info"]],
                     "training loader, one epoch at Tiny-ImageNet's shape (64×64 JPEG, batch 128)", "loader", "torch")


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


def linear_table(runs: list) -> None:
    """kd_loss_linear against the materialised paths: time and peak extra memory, each as a ratio to fastkd's
    materialised path."""
    if not runs:
        return
    info = runs[0]["extra_info"]
    by = {r["extra_info"]["linear_provider"]: r for r in runs}
    base = by.get("fastkd_materialised")
    print(f"\nvocabulary-scale KD forward+backward, N×H×V = {info['shape']} {info['dtype']}, on {info['device']}\n")
    print("| provider | median s | time vs materialised | peak extra MiB | memory vs materialised |")
    print("|---|---|---|---|---|")
    for provider, run in by.items():
        median, peak = run["stats"]["median"], run["extra_info"]["peak_extra_bytes"]
        time_ratio = f"{median / base['stats']['median']:.2f}×" if base else "n/a"
        memory_ratio = f"{base['extra_info']['peak_extra_bytes'] / max(peak, 1):.1f}× less" if base else "n/a"
        print(f"| {provider} | {median:.3f} | {time_ratio} | {peak / 2**20:.0f} | {memory_ratio} |")


# The epoch-time model of BENCHMARKS.md: one image of a spaced-KD epoch of ResNet-18 at 64×64 costs the teacher's
# training step, the replay's teacher forward and the student's training step, 31.1 GFLOP (counted with
# torch.utils.flop_counter); an H100 does about 790 TFLOP/s in bf16. A round of the step benchmark is a batch of it.
SPACED_FLOP_PER_IMAGE, H100_BF16_FLOPS = 31.1e9, 790e12


def throughput_table(runs: list, title: str, key: str, baseline: str) -> None:
    """Median time per round, images/s and the ratio to the `baseline` value of extra_info[key]; for ResNet-18 on a
    GPU, also the measured time over the bf16 compute floor of the round."""
    if not runs:
        return
    floor = runs[0]["extra_info"].get("model") == "resnet18" and "CPU" not in runs[0]["extra_info"]["device"]
    print(f"\n{title} on {runs[0]['extra_info']['device']}\n")
    print(f"| {key} | median ms per round | images/s | vs {baseline} |" + (" ÷ H100 floor |" if floor else ""))
    print("|---|---|---|---|" + ("---|" if floor else ""))
    medians = {r["extra_info"][key]: r["stats"]["median"] for r in runs}
    for run in runs:
        info, median = run["extra_info"], run["stats"]["median"]
        ratio = f"{medians[baseline] / median:.2f}×" if baseline in medians else "n/a"
        row = f"| {info[key]} | {median * 1e3:.1f} | {info['images_per_round'] / median:.0f} | {ratio} |"
        if floor:  # a round is images_per_round / 2 images of the epoch model (each seen by both networks)
            round_floor = info["images_per_round"] / 2 * SPACED_FLOP_PER_IMAGE / H100_BF16_FLOPS
            row += f" {median / round_floor:.1f}× |"
        print(row)


def overhead_table(runs: list) -> None:
    """The engine against a bare loop over the same compiled step: time per steady-state step (the difference of
    the 3-epoch and the 1-epoch runs, over their difference in steps) and the engine's extra."""
    by = {(r["extra_info"]["loop"], r["extra_info"]["epochs"]): r for r in runs}
    if set(by) != {(loop, e) for loop in ("bare", "engine") for e in (1, 5)}:
        return
    medians = {}
    for loop in ("bare", "engine"):
        long, short = by[(loop, 5)], by[(loop, 1)]
        steps = long["extra_info"]["steps"] - short["extra_info"]["steps"]
        medians[loop] = (long["stats"]["median"] - short["stats"]["median"]) / steps
    print(f"\nhost overhead per step on {runs[0]['extra_info']['device']}\n")
    print("| loop | median ms per step | vs bare |")
    print("|---|---|---|")
    for loop in ("bare", "engine"):
        print(f"| {loop} | {medians[loop] * 1e3:.3f} | {medians[loop] / medians['bare'] - 1:+.1%} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py RESULTS.json")
    main(sys.argv[1])
