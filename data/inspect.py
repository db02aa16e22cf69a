"""`rayft data inspect`: the first kept examples as the model sees them, trained-on spans marked.

Tool-calling rows show the tool list in the system turn, the assistant's <tool_call> blocks (trained on)
and the tool results (not trained on), exactly as the model is trained on them.

Runs on the driver without Ray (it reads only the head of each source), using the same functions
as the pipeline: normalise, redact, render, tokenize, truncate.
"""
from __future__ import annotations

from .chat import fit_conversation
from .config import DataConfig
from .formats import iter_records
from .pipeline import TokenizerSpec, _head, load_tokenizer, plan_sources
from .redact import redact_messages
from .schemas import Reject, apply_column_map, read_conversation

GREEN, RESET = "\033[32m", "\033[0m"


def mark_spans(tokenizer, input_ids: list[int], loss_mask: list[int], color: bool) -> str:
    """Decode runs of equal mask; trained-on runs in green or between [[ and ]]."""
    out = []
    i = 0
    while i < len(input_ids):
        j = i
        while j < len(input_ids) and loss_mask[j] == loss_mask[i]:
            j += 1
        text = tokenizer.decode(input_ids[i:j], skip_special_tokens=False)
        if loss_mask[i]:
            text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
        out.append(text)
        i = j
    return "".join(out)


def inspect_examples(cfg: DataConfig, spec: TokenizerSpec, n: int, color: bool = False) -> str:
    tok = load_tokenizer(spec)
    plans = plan_sources(cfg, log=lambda _: None)
    blocks = []
    shown = 0
    per_source = max(1, -(-n // len(plans)))
    for plan in plans:
        taken = 0
        for f in plan.files:
            for rec in iter_records(_head(f, plan.formats[f]), plan.formats[f]):
                if shown >= n or taken >= per_source:
                    break
                where = f"{plan.name} {f.rsplit('/', 1)[-1]} row {rec.row}"
                if rec.record is None:
                    continue
                try:
                    msgs, tools = read_conversation(apply_column_map(rec.record, plan.config["column_map"]), plan.schema,
                                                    plan.config["system_prompt"])
                except Reject:
                    continue
                if cfg.redact_pii:
                    msgs, _ = redact_messages(msgs)
                ids, mask, cut, why = fit_conversation(msgs, tok, cfg.max_seq_length, cfg.truncation, cfg.chat_template,
                                                       tools=tools)
                if ids is None:
                    continue
                head = f"=== {where}: {len(ids)} tokens, {sum(mask)} trained on{', truncated' if cut else ''} ==="
                blocks.append(head + "\n" + mark_spans(tok, ids, mask, color))
                shown += 1
                taken += 1
    legend = "trained-on tokens are green" if color else "trained-on tokens are between [[ and ]]"
    return "\n\n".join(blocks + [f"({shown} example(s); {legend})"])
