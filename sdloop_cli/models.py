"""`sdloop export`, `sdloop models` and `sdloop serve`: ONNX exports, model versions, the service.

Part of the command line (``sdloop_cli.main`` assembles the parser): it parses and calls the stage; the stage's
``UserError`` becomes one line in ``sdloop_cli.main.main``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sdloop.errors import UserError


def _export_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ExportConfig values from the flags, then --set KEY=VALUE, read by the one parser every command uses
    (``sdloop.overrides``: YAML 1.2, typed against the field, so ``--set guidance_scale=5e-1`` is a number)."""
    from export.config import ExportConfig
    from sdloop.overrides import apply_overrides

    values: dict[str, Any] = {}
    for key in ("target", "precision", "threads", "steps", "size"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if args.prompt:
        values["prompts"] = list(args.prompt)
    if args.external_data_mb is not None:
        values["external_data_mb"] = args.external_data_mb
    return apply_overrides(ExportConfig, values, args.set or [])


def cmd_export(args: argparse.Namespace) -> int:
    """Fuse a run's LoRA, export it with optimum, optimise it for a target, prove parity; print the summary."""
    if args.help_config:
        from export.config import ExportConfig
        from sdloop.overrides import config_help

        print(config_help(ExportConfig))
        return 0
    if args.run_dir is None:
        args.export_parser.error("the following arguments are required: RUN_DIR")
    from export.build import ExportConfig, build_export

    cfg = ExportConfig.from_dict(_export_settings(args))
    result = build_export(Path(args.run_dir), Path(args.output) if args.output else None, cfg,
                          progress=not args.quiet)
    print(result.summary)
    print(f"export:   {result.export_dir}")
    print(f"manifest: {result.export_dir / 'manifest.json'}")
    print(f"publish:  sdloop models publish {result.export_dir}")
    return 0


def cmd_models_help(args: argparse.Namespace) -> int:
    args.models_parser.print_help(sys.stderr)
    return 2


def cmd_models_publish(args: argparse.Namespace) -> int:
    from export.registry import publish

    tag, created = publish(Path(args.export_dir), name=args.name)
    print(f"{'published' if created else 'already published as'} {tag}")
    print(f"promote it: sdloop models promote {tag}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """Every version, one row each: quality (what the run scored), parity (how closely the export draws what fp32
    PyTorch draws: not a quality score) and latency (with how it was measured) in their own columns."""
    from export.registry import list_versions

    versions = list_versions(args.name)
    if args.json:
        print(json.dumps([{"tag": v.tag, "stage": v.stage, "created": v.created, "labels": v.labels,
                           "key_metrics": v.key_metrics(), "quality": v.quality_text(),
                           "parity_vs_pytorch_fp32": v.parity_text(), "latency": v.latency_text(),
                           "damaged": v.damaged} for v in versions], indent=2))
        return 0
    if not versions:
        print(f"no versions of model {args.name!r} yet; publish one with `sdloop models publish EXPORT_DIR`.")
        return 0
    rows = [("TAG", "STAGE", "SOURCE RUN", "TARGET", "PUBLISHED (UTC)", "QUALITY", "PARITY VS PYTORCH FP32",
             "LATENCY")]
    for v in versions:
        target = f"{v.labels.get('target', '?')}/{v.labels.get('precision', '?')}"
        tail = ((f"damaged: {v.damaged}", "", "") if v.damaged else
                (v.quality_text() or "-", v.parity_text() or "-", v.latency_text() or "-"))
        rows.append((v.tag, v.stage, v.labels.get("source_run", "?")[:28], target, v.created) + tail)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _summary(v: Any, events: list[dict[str, Any]], state: dict[str, Any]) -> list[str]:
    """``sdloop models show TAG``: the dozen lines a person needs to decide about a version."""
    md = v.metadata
    rt = md.get("runtime") or {}
    providers = ", ".join(p[0] if isinstance(p, list) and p else str(p) for p in rt.get("providers") or []) or "?"
    lim = md.get("limits") or {}
    run = md.get("source_run") or {}
    lat = md.get("latency") or {}
    parity = md.get("parity") or {}
    lines = [f"{v.tag}",
             f"  stage:        {v.stage}",
             f"  published:    {v.created} UTC (export made {md.get('created', '?')})",
             f"  source run:   {run.get('name') or v.labels.get('source_run', '?')} ({run.get('path', '?')})",
             f"  runtime:      {md.get('target', v.labels.get('target', '?'))}/"
             f"{md.get('precision', v.labels.get('precision', '?'))}, {providers}, "
             f"{rt.get('intra_op_num_threads', '?')} intra-op thread(s)",
             f"  family:       {md.get('family') or 'sd1 (recorded before families)'}",
             f"  native size:  {md.get('native_width', '?')}x{md.get('native_height', '?')}",
             f"  limits:       sides {lim.get('min_side', '?')}-{lim.get('max_side', '?')} px, multiples of "
             f"{lim.get('side_multiple', '?')}; prompts up to {lim.get('max_tokens', '?')} tokens",
             f"  quality:      {v.quality_text() or 'no validation loss or evaluation recorded'}",
             f"  parity:       vs PyTorch fp32 on {parity.get('images', '?')} image(s): {v.parity_text() or '?'}: "
             f"{'passed' if parity.get('passed') else 'NOT passed'} (not a quality score)"]
    if lat:
        lines.append(f"  latency:      {v.latency_text() or '?'}; {lat.get('size', '?')} px, {lat.get('steps', '?')} "
                     f"steps, {lat.get('threads', '?')} thread(s), timed by the export where it ran")
    else:
        lines.append("  latency:      not recorded")
    champ = state.get("champion")
    since = [e for e in events if e.get("tag") == v.tag]
    if v.stage == "champion":
        when, why = (since[-1].get("when", "?"), str(since[-1].get("reason", ""))) if since else ("?", "")
        why = why if len(why) <= 80 else why.split(": ", 1)[0][:80] + " ... (sdloop models history)"
        lines.append(f"  champion:     yes, since {when}" + (f" ({why})" if why else ""))
    else:
        lines.append(f"  champion:     no (the champion is {champ or 'none yet'}; "
                     f"{len(since)} earlier promotion(s) of this version)")
    lines.append(f"  damaged:      {'yes: ' + v.damaged if v.damaged else 'no (its files verify)'}")
    lines.append(f"  folder:       {v.path}")
    lines.append(f"  everything:   sdloop models show {v.tag} --json")
    return lines


def cmd_models_show(args: argparse.Namespace) -> int:
    from export.registry import history, read_state, show

    v = show(args.tag, args.name)
    events = [e for e in history(args.name) if v.tag in (e.get("tag"), e.get("previous"))]
    if not args.json:
        print("\n".join(_summary(v, events, read_state(args.name))))
        return 0
    print(json.dumps({"tag": v.tag, "stage": v.stage, "created": v.created, "path": str(v.path),
                      "damaged": v.damaged, "labels": v.labels, "metadata": v.metadata,
                      "champion_history": events}, indent=2))
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from export.registry import promote

    e = promote(args.tag, args.reason or "", args.name)
    print(f"champion: {e['tag']} (was {e['previous'] or 'none'}); reason: {e['reason']}")
    print(_smoke_line(e))
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from export.registry import rollback

    e = rollback(args.reason or "", args.name)
    print(f"champion: {e['tag']} (rolled back from {e['previous']}); reason: {e['reason']}")
    print(_smoke_line(e))
    return 0


def _smoke_line(e: dict[str, Any]) -> str:
    """What the smoke test saw before the version became the champion."""
    s = e.get("smoke_test") or {}
    return (f"smoke test: one {s.get('width')}x{s.get('height')} image in {s.get('steps')} steps, pixel range "
            f"{s.get('pixel_range')} of 255, loaded as the service loads it")


def cmd_models_prune(args: argparse.Namespace) -> int:
    from export.registry import prune

    gone = prune(args.keep, args.name)
    print(f"deleted {len(gone)} version(s){': ' + ', '.join(gone) if gone else ''}; the champion and the version a "
          "rollback returns to are always kept")
    return 0


def cmd_models_history(args: argparse.Namespace) -> int:
    from export.registry import history

    events = history(args.name)
    if not events:
        print(f"model {args.name!r} has had no champion yet.")
    for e in events:
        print(f"{e.get('when', '?')}  {e.get('action', '?'):8s} {e.get('tag', '?')}  "
              f"(was {e.get('previous') or 'none'})  {e.get('reason', '')}  [{e.get('user', '?')}]")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the champion with `bentoml serve` from the repo root, on the workspace's model store and monitoring store.
    The process becomes the BentoML server (exec), so its PID is the server's and Ctrl-C or SIGTERM stops it.

    Before that it checks what would otherwise fail in every worker, over and over: the service's settings
    (``ServeConfig``, from the environment), the monitoring store (opened once) and the port (bound for a moment);
    each problem is one line and exit 2. The store URL is printed with its password masked."""
    from bento.config import ServeConfig, check_exposure, check_port, check_store
    from sdloop.workspace import home, use_bentoml_home

    root = Path(__file__).resolve().parent.parent
    if not (root / "bentofile.yaml").is_file() or not (root / "bento" / "service.py").is_file():
        raise UserError(f"{root} is not an sdloop source tree (no bentofile.yaml); serve a built Bento with "
                        "`bentoml serve sdloop:latest` instead.")
    for flag, value, low in (("--workers", args.workers, 0), ("--threads", args.threads, 1),
                             ("--torch-threads", args.torch_threads, 0), ("--port", args.port, 1)):
        if value is not None and (value < low or (flag == "--port" and value > 65535)):
            raise UserError(f"{flag} {value} is out of range: use an integer >= {low}"
                            f"{' and <= 65535' if flag == '--port' else ''}.")
    os.environ["SDLOOP_HOME"] = str(home())
    use_bentoml_home()
    flags = {"SDLOOP_WORKERS": args.workers, "SDLOOP_THREADS": args.threads,
             "SDLOOP_TORCH_THREADS": args.torch_threads, "SDLOOP_BACKEND": args.backend}  # a flag given wins
    os.environ.update({key: str(value) for key, value in flags.items() if value is not None})
    if args.insecure_no_auth:
        os.environ["SDLOOP_ALLOW_NO_AUTH"] = "1"
    cfg = ServeConfig.from_env()
    check_exposure(cfg, args.host)
    store = check_store(cfg)
    check_port(args.host, args.port)
    argv = [sys.executable, "-m", "bentoml", "serve", "bento.service:SDService", "--host", args.host,
            "--port", str(args.port), "--working-dir", str(root)]
    threads = cfg.torch_threads or ("the export's" if cfg.backend == "onnx" else "cores / workers")
    print(f"serving the champion of {os.environ['BENTOML_HOME']} on http://{args.host}:{args.port} "
          f"({cfg.workers} worker(s), {cfg.backend}, intra-op threads per worker: {threads}); store: {store}",
          flush=True)
    os.chdir(root)
    os.execv(argv[0], argv)
    return 0  # not reached


def add_parsers(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add this module's commands to the top-level subparsers."""
    p = sub.add_parser("export", help="fuse a run's LoRA, export ONNX with optimum, optimise for onnxruntime, "
                       "check parity with PyTorch")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a finished run folder (sdloop train --output)")
    p.add_argument("--output", help="export folder to write (default $SDLOOP_HOME/exports/<run>-<target>-<precision>)")
    p.add_argument("--target", choices=("cpu", "cuda", "tensorrt"), default=None,
                   help="onnxruntime execution provider to optimise for (default cpu)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="cpu: fp32 (default) or int8; cuda/tensorrt: fp16 (default) or fp32")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime/torch threads (default: all cores)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the parity images (default 20)")
    p.add_argument("--size", type=int, default=None, help="parity image side in pixels (default: the run's)")
    p.add_argument("--prompt", action="append", help="a parity prompt (repeatable; default: three built in)")
    p.add_argument("--external-data-mb", dest="external_data_mb", type=float, default=None,
                   help="graphs whose weights reach this size use ONNX external data (default 1024)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any export setting, e.g. --set int8_images=16 --set tolerances.min_psnr=45 (see "
                   "--help-config)")
    p.add_argument("--help-config", action="store_true", help="list every export setting with its default and help")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export, export_parser=p)

    p_models = sub.add_parser("models", help="model versions in the BentoML store: publish, list, show, promote, "
                              "rollback, prune, history")
    p_models.set_defaults(func=cmd_models_help, models_parser=p_models)
    models_sub = p_models.add_subparsers(dest="models_command", metavar="ACTION")
    for action, func, text in (
            ("publish", cmd_models_publish, "save an export folder as a new version (labels/metadata: its manifest)"),
            ("list", cmd_models_list, "every version with its stage, source run, key metrics and date"),
            ("show", cmd_models_show, "one version in a dozen lines: run, runtime, size, limits, parity, "
             "latency, champion, damaged (--json: everything)"),
            ("promote", cmd_models_promote, "make a version the champion (the service serves it) after its "
             "smoke test"),
            ("rollback", cmd_models_rollback, "make the previous champion the champion again, after its smoke test"),
            ("prune", cmd_models_prune, "delete old versions, never the champion or the one a rollback returns to"),
            ("history", cmd_models_history, "when which version was champion, and why")):
        p = models_sub.add_parser(action, help=text)
        if action == "publish":
            p.add_argument("export_dir", metavar="EXPORT_DIR", help="a folder made by sdloop export")
        if action in ("show", "promote"):
            p.add_argument("tag", metavar="TAG", help="NAME:VERSION or VERSION, as `sdloop models list` shows")
        if action in ("promote", "rollback"):
            p.add_argument("--reason", help="why (kept in the history; default: 'promoted' / 'rolled back')")
        if action == "prune":
            p.add_argument("--keep", type=int, required=True, help="newest versions to keep (plus the champion "
                           "and the one a rollback returns to)")
        if action in ("list", "show"):
            p.add_argument("--json", action="store_true", help="print JSON" + (" (everything: labels, metadata, "
                           "champion history)" if action == "show" else ""))
        p.add_argument("--name", default="sdloop", help="model name in the store (default sdloop)")
        p.set_defaults(func=func)

    p = sub.add_parser("serve", help="serve the champion over HTTP with BentoML (txt2img, feedback, /metrics)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    p.add_argument("--workers", type=int, default=None, help="worker processes, one pipeline each (default: "
                   "$SDLOOP_WORKERS, else one per core)")
    p.add_argument("--threads", type=int, default=None, help="request threads per worker (default: $SDLOOP_THREADS, "
                   "else 8)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="onnxruntime/torch intra-op threads per worker (default: the export's own, from its "
                   "manifest; pytorch backend: cores / workers)")
    p.add_argument("--backend", choices=("onnx", "pytorch"), default=None,
                   help="onnx: the exported onnxruntime pipeline; pytorch: the source run's pipeline (fallback) "
                   "(default: $SDLOOP_BACKEND, else onnx)")
    p.add_argument("--insecure-no-auth", dest="insecure_no_auth", action="store_true",
                   help="serve a non-loopback --host without API keys (SDLOOP_AUTH=off) anyway")
    p.set_defaults(func=cmd_serve)
