"""Evaluation: the model answers a golden set (greedy, batched, transformers) and task metrics score it.

    golden.py    the golden set: the run's eval split, or sources of its own (any source the data pipeline reads)
    generate.py  batched greedy generation
    metrics.py   exact match, token F1, ROUGE-L, JSON validity, JSON-schema match
    run.py       one evaluation: answers, per-example results (<run>/eval/results.jsonl), aggregates (MLflow)
    compare.py   two models on the same golden set: paired bootstrap intervals, the examples that changed most
    sources.py   what `--model` names (a folder, models:/NAME@alias, runs:/RUN_ID/adapter) as a local folder
    lm_eval.py   lm-eval-harness on local task files (optional: pip install 'rayft[eval]')
"""
