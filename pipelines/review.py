"""Stage `medmoco review`: the registry as the review desk (:mod:`medmoco.registry`).

    medmoco review --name NAME                                     # candidates, and the release history
    medmoco review --compare 3 [--against champion] --cache DIR --out DIR [--split test] [--cases 8]
    medmoco review --compare 3 --input DICOM_FOLDER_OR_ARCHIVE --labels CSV --out DIR
    medmoco review --promote 3 --alias champion --cache DIR [--force --reason TEXT]
"""
from __future__ import annotations

import argparse

from dicom_preprocess.config import ConfigError

from medmoco.registry.names import MODEL_NAME, REVIEW_EXPERIMENT, candidates_name, released_name
from medmoco.registry.history import decisions_by_split, release_history  # noqa: F401
from medmoco.registry.release import DEFAULT_MARGIN, PromotionRefused, promote  # noqa: F401
from medmoco.registry.review import compare_versions, format_table, versions_table  # noqa: F401


def add_review_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=MODEL_NAME, help="registered model")
    parser.add_argument("--compare", metavar="CANDIDATE", help="version number or alias to compare")
    parser.add_argument("--against", default="champion", metavar="REFERENCE", help="version or alias (champion)")
    parser.add_argument("--promote", metavar="VERSION", help="version to give --alias, after a comparison")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--cache", help="cache whose --split both models predict")
    parser.add_argument("--split", default=None,
                        help="cache split: --compare reads test by default; --promote and --plan the cache's release "
                             "split when it has one, else test (with a warning)")
    parser.add_argument("--plan", action="store_true",
                        help="how often an equally good candidate would pass at --margin on --cache's decision split")
    parser.add_argument("--input", help="raw DICOM folder or archive: each model's own preprocessing on it")
    parser.add_argument("--labels", help="RSNA long-format CSV for --input")
    parser.add_argument("--out", help="folder for comparison.json/.md, predictions and cases/")
    parser.add_argument("--cases", type=int, default=8, help="tiles per montage (0: no montages)")
    parser.add_argument("--margin", type=float, default=None,
                        help="non-inferiority margin in mean AUC (default: the admin's policy, else "
                             f"{DEFAULT_MARGIN}); another value makes a promotion forced (--force --reason)")
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-patients", dest="min_patients", type=int, default=None,
                        help="fewest positive and negative patients a class needs for an interval (default 10; "
                             "below it the interval is withheld)")
    parser.add_argument("--force", action="store_true", help="promote even if not non-inferior (needs --reason)")
    parser.add_argument("--reason", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default="")


def run_review(args: argparse.Namespace) -> int:
    from medmoco.comparison import markdown

    if args.compare:
        if not args.out:
            raise ConfigError("--compare needs --out DIR")
        comparison = compare_versions(args.name, args.compare, args.against, args.out, args.cache, args.split or "test",
                                      args.input, args.labels, args.cases, args.replicates, args.level, args.seed,
                                      args.device, args.tracking_uri, min_groups=args.min_patients)
        print(markdown(comparison))
        print(f"-> {args.out} (comparison.json, comparison.md, predictions_*.csv, cases/); MLflow run "
              f"{comparison['run_id']} in {REVIEW_EXPERIMENT}")
    if args.promote is not None:
        try:
            result = promote(args.name, args.promote, args.alias, args.cache, args.split, args.margin, args.force,
                             args.reason, args.out, args.tracking_uri, args.cases, args.replicates, args.level,
                             args.seed, args.device, min_groups=args.min_patients)
        except PromotionRefused as err:
            table, _, reason = str(err).rpartition("\n")
            print(table)
            raise PromotionRefused(reason) from None
        if result["comparison"] is not None:
            print(markdown(result["comparison"]))
        print(result["message"])
    if args.plan:
        print_plan(args)
        return 0
    return 0 if print_review(args.name, args.tracking_uri, args.alias) else 1


def print_plan(args: argparse.Namespace) -> None:
    """`review --plan`: the margin a lab can afford on its decision split (medmoco.margin)."""
    from medmoco.registry.release import plan_margin

    plan = plan_margin(args.name, args.cache, args.margin, args.alias, args.split, args.tracking_uri, args.seed,
                       args.min_patients)
    rate, ci = plan["pass_rate"], plan["pass_rate_ci"]
    print(f"margin plan on {plan['split']} ({plan['n_units']} patients; reference {plan['reference']}):")
    print(f"  an equally good candidate passes at margin {plan['margin']:g} in "
          + (f"{rate:.0%} of {plan['n_sim']} simulated comparisons (95% CI {ci[0]:.0%}-{ci[1]:.0%})" if rate is not None
             else "none of the simulated comparisons (no interval could be computed)"))
    if plan["sd_delta"] is not None:
        print(f"  SD of the mean-AUC difference {plan['sd_delta']:.4f}: a margin of {plan['margin_for_power']:.4f} lets "
              f"it pass with probability {plan['power']:.0%}")
    for reason, count in sorted(plan["refusals"].items(), key=lambda kv: -kv[1])[:3]:
        print(f"  refused {count}x: {reason}")


def print_review(name: str, tracking_uri: str = "", alias: str = "champion") -> bool:
    """The candidates table, then the release history and its verification (True: it verifies)."""
    print(f"candidates ({candidates_name(name)}):")
    print(format_table(versions_table(name, tracking_uri, alias)))
    rows, warnings = release_history(name, tracking_uri, alias)
    print(f"\nreleased ({released_name(name)}; users load models:/{released_name(name)}@{alias}):")
    print(format_table(rows) if rows else "(nothing released yet)")
    decisions = decisions_by_split(name, tracking_uri)
    if decisions:
        print("decisions per split (each decision read on a split spends it):")
        for fingerprint, d in decisions.items():
            print(f"  {d['split']} {fingerprint[:8]}: {d['released'] + d['refused']} ({d['released']} released, "
                  f"{d['refused']} refused)")
    if not warnings:
        print(f"history verified ({len(rows)} releases: promotion records chained, released files and evidence "
              "match their digests)")
        return True
    print(f"history NOT verified: {warnings[0]}")
    for line in warnings[1:]:
        print(f"  also: {line}")
    return False
