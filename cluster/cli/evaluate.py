"""`rayft eval FILE --model M` and `rayft eval FILE --compare A B`: task metrics on the config's golden set."""
from __future__ import annotations

from .common import load_args_config, with_file
from .errors import UserError


def add_eval(sub, command) -> None:
    ev = with_file(sub.add_parser("eval", help=command.help))
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="M",
                       help="a model or adapter folder, models:/NAME@alias, models:/NAME/VERSION or runs:/RUN_ID/adapter")
    which.add_argument("--compare", nargs=2, metavar=("A", "B"),
                       help="evaluate A and B on the same golden set; per metric B - A with a paired bootstrap interval")
    ev.add_argument("--out", help="folder for results.jsonl and summary.json (default: <storage_path>/<name>/eval)")
    ev.add_argument("--confidence", type=float, default=0.95, help="with --compare: interval level (default 0.95)")
    ev.add_argument("--top", type=int, default=5, help="with --compare: how many most-changed examples to print")
    ev.set_defaults(fn=cmd_eval)


def cmd_eval(args) -> int:
    """Generate answers to the golden set (greedy, batched) and score them; results to the run's eval folder and
    MLflow."""
    import functools
    import json

    from rayft.data import storage
    from rayft.eval.compare import compare, format_comparison
    from rayft.eval.config import EvalError
    from rayft.eval.golden import load_golden
    from rayft.eval.run import evaluate_source, log_to_mlflow, write_results
    from rayft.registry.tracking import tracking_uri
    from rayft.security.artifacts import opened_for_load

    cfg = load_args_config(args)
    if not 0 < args.confidence < 1:
        raise UserError(f"--confidence {args.confidence}: must be between 0 and 1, for example 0.95")
    if args.top < 0:
        raise UserError(f"--top {args.top}: must be 0 or more")
    ecfg = cfg.eval
    uri = tracking_uri(cfg.tracking.tracking_uri, cfg.storage_root) if cfg.tracking.enabled else None
    out_dir = args.out or storage.join(cfg.storage_root, cfg.name, "eval")
    opener = functools.partial(opened_for_load, security=cfg.security)
    try:
        golden = load_golden(cfg.data, ecfg.sources, log=print)
        print(golden.describe())
        examples = golden.sample(ecfg.max_examples, ecfg.seed)
        run = functools.partial(evaluate_source, base=cfg.model, examples=examples, cfg=ecfg, opener=opener,
                                tracking_uri=uri, chat_template=cfg.data.chat_template)
        if args.model:
            results = [run(args.model)]
            path = write_results(results[0], out_dir)
            print(f"per-example results: {path}")
        else:
            a, b = run(args.compare[0], label=f"A {args.compare[0]}"), run(args.compare[1], label=f"B {args.compare[1]}")
            a.model, b.model = args.compare
            results = [a, b]
            write_results(a, out_dir, "compare-a")
            write_results(b, out_dir, "compare-b")
            comparison = compare(a, b, ecfg.bootstrap_samples, args.confidence, ecfg.seed, args.top)
            storage.write_text(storage.join(out_dir, "comparison.json"), json.dumps(comparison.as_dict(), indent=2))
            print(format_comparison(comparison))
            print(f"per-example results: {storage.join(out_dir, 'compare-a.jsonl')}, "
                  f"{storage.join(out_dir, 'compare-b.jsonl')}; comparison: {storage.join(out_dir, 'comparison.json')}")
    except EvalError as e:
        raise UserError(str(e)) from None
    if uri:
        import time

        stamp = time.strftime("%Y%m%d-%H%M%S")  # each evaluation is a run of its own
        run_id = log_to_mlflow(uri, cfg.tracking.experiment, f"{cfg.name}/eval-{stamp}", cfg.storage_root, results,
                               out_dir,
                               params={"models": [r.model for r in results], "eval": ecfg.model_dump(mode="json"),
                                       "golden_examples": len(examples)})
        print(f"MLflow run {run_id} ({uri})")
    return 0
