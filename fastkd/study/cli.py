"""python -m fastkd.study: every method under every seed with one budget, then accuracy and flatness compared.

Runs go to <out>/runs/<method>-seed<k>/ (ordinary fastkd run folders). Started again with the same --out, the study
skips finished runs, continues interrupted ones from their checkpoints, and refuses a folder whose runs were made
with other settings. It writes results.md, results.json, curves.png and flatness.png into --out, and
interval_curve.png when --intervals asks for a curve.
"""
import json
import sys
from pathlib import Path

from ..cli import OneLineErrorParser
from ..config import DEFAULTS
from ..engine import Interrupted
from ..step_functions import FEATURE_LOSSES
from .aggregate import aggregate
from .plan import run_configs
from .report import write_markdown, write_plots
from .runs import run_study


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser("fastkd.study", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--methods", default="baseline,online,spaced,self,spaced-self", help="comma-separated methods to compare")
    a("--seeds", type=int, default=5, help="seeds per method (seed k sets initialisation, data subset, order)")
    a("--first-seed", type=int, default=0, help="seeds run from this one upwards")
    a("--out", required=True, help="study folder; run the same command again to resume")
    a("--intervals", nargs="+", default=None, metavar="S[,S...] | METHOD=S[,S...]",
      help="the interval curve: every spaced method of --methods at each interval s (in epochs), or per method "
           "(spaced=0.5,1.5 spaced-self=2,4); each paired by seed with its unspaced counterpart (online, self), "
           "which is added to the study when missing")
    a("--official-point", action="store_true",
      help="add every spaced method of the study and its counterpart at the default interval with the official "
           "preset's loss and lr schedule (quirks, feature term, constant lr 0.01), at the study's epochs")
    a("--equal-steps-control", action="store_true",
      help="add self KD with spaced-self's number of optimizer steps (twice the epochs): the control of its "
           "second step per batch")
    train_flags = p.add_argument_group("training (identical for every method)")
    t = train_flags.add_argument
    t("--dataset", default=DEFAULTS.dataset)
    t("--data-dir", default=None)
    t("--loader", default=DEFAULTS.loader)
    t("--epochs", type=int, default=DEFAULTS.epochs)
    t("--batch-size", type=int, default=DEFAULTS.batch_size)
    t("--train-subset", type=int, default=None, metavar="N", help="seeded subset of N training samples per seed")
    t("--lr", type=float, default=DEFAULTS.lr)
    t("--lr-schedule", default=DEFAULTS.lr_schedule)
    t("--teacher", default=None, help="default: the dataset's model")
    t("--student", default=None, help="default: the dataset's model (multi-exit for self methods)")
    t("--temperature", type=float, default=DEFAULTS.temperature)
    t("--alpha", type=float, default=DEFAULTS.alpha)
    t("--beta", type=float, default=DEFAULTS.beta)
    t("--feature-loss", choices=("auto", "none", *FEATURE_LOSSES), default=None,
      help="the two-network methods' feature term (default: auto for online, spaced and offline: dist where the "
           "teacher's and the student's feature widths are equal, else none)")
    t("--device", default=DEFAULTS.device)
    t("--compile", action="store_true")
    flat = p.add_argument_group("flatness of each final student (training loss, eval mode)")
    f = flat.add_argument
    f("--analysis-samples", type=int, default=512, help="training samples in the loss (first batches of epoch 0)")
    f("--hessian-probes", type=int, default=32, help="Rademacher probes of the Hutchinson trace")
    f("--sharpness-radius", type=float, default=0.1, help="perturbation size relative to each weight tensor")
    f("--sharpness-draws", type=int, default=10, help="random perturbations averaged")
    f("--profile-radius", type=float, default=0.5, help="the 1-D profile spans t in [-r, r] along a random direction")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python -m fastkd.study " + " ".join(argv)
    try:
        study = run_configs(args)
        out = Path(args.out)
        results = run_study(study, out, args)
        labels = list(dict.fromkeys(run.label for run in study))
        agg = aggregate(results, labels)
        (out / "results.json").write_text(json.dumps({"command": command, "aggregate": agg, "runs": results},
                                                     indent=1) + "\n")
        write_markdown(out / "results.md", agg, command, [run.cfg for run in study], results)
        write_plots(out, results, labels, agg)
    except ValueError as e:
        print(f"fastkd.study: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"fastkd.study: {e}; or run the same study command again", file=sys.stderr)
        return 128 + e.signum
    print(f"fastkd.study: {len(study)} runs; results in {out / 'results.md'}")
    return 0
