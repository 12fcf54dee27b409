"""`sdloop eval` and `sdloop review`: metrics and report of a run, a comparison, the blind review page.

Part of the command line (``sdloop_cli.main`` assembles the parser): it parses and calls the stage; the stage's
``UserError`` becomes one line in ``sdloop_cli.main.main``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sdloop.errors import UserError


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a run against its base, or (--compare) two runs against each other; print the table and paths."""
    from finetune.evaluation.evaluate import compare_runs, evaluate_run

    opts = {"prompts": args.prompts, "n": args.n, "reference": args.reference, "features": args.features,
            "clip": args.clip, "is_classifier": args.is_classifier, "steps": args.steps, "guidance": args.guidance,
            "seed": args.seed, "resamples": args.bootstrap, "quiet": args.quiet}
    if args.compare:
        if len(args.runs) != 2:
            raise UserError(f"--compare needs two run folders (sdloop eval --compare RUN_A RUN_B), "
                            f"got {len(args.runs)}.")
        result = compare_runs(args.runs[0], args.runs[1], out_dir=args.output, **opts)
    else:
        if len(args.runs) != 1:
            raise UserError(f"sdloop eval takes one run folder, got {len(args.runs)}; to compare two runs pass "
                            "--compare RUN_A RUN_B.")
        if args.output:
            raise UserError("--output is for --compare; an evaluation is written into RUN_DIR/eval/.")
        result = evaluate_run(args.runs[0], **opts)
    print("\n".join(result.lines()))
    print(f"images:  {result.generated} generated, {result.reused} reused from earlier evaluations")
    print(f"report:  {result.report}")
    print(f"json:    {result.json_path}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    """Serve the blind review page for two runs (``sdloop review summary DIR`` reads the votes)."""
    if args.first == "summary":
        return cmd_review_summary(args)
    from finetune.evaluation.review import prepare_review
    from finetune.evaluation.review_server import ReviewServer

    folder = prepare_review(args.first, args.second, out_dir=args.dir, prompts=args.prompts, n=args.n,
                            steps=args.steps, guidance=args.guidance, seed=args.seed, progress=not args.quiet)
    server = ReviewServer(folder, host=args.host, port=args.port)
    print(f"review folder: {folder}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: the page has no login; anyone who can reach {args.host}:{args.port} can open it and vote "
              "(each browser is one signed reviewer; forged or altered reviewer ids are refused).")
    print(f"serving the blind review at {server.url}  (Ctrl-C stops; each vote is saved as it is cast)")
    print(f"results: sdloop review summary {folder}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped; the votes are in " + str(folder / "votes.sqlite"))
    finally:
        server.httpd.server_close()
        server.app.flush_refused()
    return 0


def cmd_review_summary(args: argparse.Namespace) -> int:
    """Print the review's win rate, counts and sign test (``--json`` for the numbers as JSON)."""
    from finetune.evaluation.review_summary import summarize

    summary = summarize(getattr(args, "review_dir", None) or args.second)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else "\n".join(summary.lines()))
    return 0


def summary_parser() -> argparse.ArgumentParser:
    """`sdloop review summary`'s own parser, so its --help shows its own usage (``sdloop_cli.main`` routes to it)."""
    p = argparse.ArgumentParser(prog="sdloop review summary",
                                description="the blind review's result: win rate, counts and a sign test")
    p.add_argument("review_dir", metavar="DIR", help="a review folder (`sdloop review` prints it)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--quiet", action="store_true", help="accepted as `sdloop review` takes it (a summary shows no "
                                                        "progress)")
    p.set_defaults(func=cmd_review_summary)
    return p


def add_parsers(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add this module's commands to the top-level subparsers."""
    p = sub.add_parser("eval", help="FID/KID (real Inception), image statistics, HTML report: fine-tuned vs base")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a finished run folder (two with --compare)")
    p.add_argument("--compare", action="store_true", help="compare two runs: RUN_A (champion) and RUN_B (challenger)")
    p.add_argument("--prompts", help="prompt file, one a line (default: the validation split's captions)")
    p.add_argument("--n", type=int, default=None, help="images per model (default: 16, a whole number per prompt)")
    p.add_argument("--reference", help="folder of reference images (default: the validation split's images)")
    p.add_argument("--features", help="TorchScript feature extractor (float RGB 299x299 in [0,1] -> [N, d]) "
                   "instead of the FID Inception (default: the FID Inception)")
    p.add_argument("--clip", help="CLIP weights for the CLIP score: a local CLIPModel folder or a hub id "
                   "(default: none, no CLIP score)")
    p.add_argument("--is-classifier", dest="is_classifier",
                   help="TorchScript classifier for the Inception Score (float RGB 299x299 in [0,1] -> logits; "
                   "default: none, no Inception Score)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (the base's scheduler)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the image seeds and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--output", help="with --compare: folder to write (default RUN_B/eval/compare-<RUN_A name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("review", help="blind human review page for two runs; `review summary DIR` reads the votes")
    p.add_argument("first", metavar="RUN_A|summary", help="run A (or `summary` to summarise a review folder)")
    p.add_argument("second", metavar="RUN_B|DIR", help="run B (or, after `summary`, the review folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=8765, help="port to serve on (0: any free port)")
    p.add_argument("--dir", help="review folder (default $SDLOOP_HOME/reviews/<A>-vs-<B>)")
    p.add_argument("--prompts", help="prompt file, one a line (default: run A's validation captions)")
    p.add_argument("--n", type=int, default=None, help="pairs to review (default: 16, a whole number per prompt)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the image seeds")
    p.add_argument("--json", action="store_true", help="with summary: print the numbers as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_review)
