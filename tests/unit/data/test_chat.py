"""Chat rendering and loss masking, checked token by token with the tiny tokenizer."""
import pytest
from transformers import AutoTokenizer

from rayft.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    IM_END,
    TemplateError,
    fit_conversation,
    render_conversation,
    render_prompt,
    render_segments,
)

SINGLE = [
    {"role": "user", "content": "How do I reset my laptop password?"},
    {"role": "assistant", "content": "Go to the ID portal, choose Forgot password and verify with your authenticator app."},
]

MULTI = [
    {"role": "system", "content": "You are the Northwind Labs helpdesk. Answer briefly."},
    {"role": "user", "content": "Hi, I need VPN access on my tablet."},
    {"role": "assistant", "content": "Install NorthGate VPN from the Software Center."},
    {"role": "user", "content": "Done. It asks for a code?"},
    {"role": "assistant", "content": " Approve the prompt in your authenticator app, then enter the 6-digit code."},
    {"role": "user", "content": "Thanks, that works!"},
    {"role": "assistant", "content": "You're welcome. Anything else I can help with?"},
]

# A Llama-3-like template: headers around each role, <|eot_id|> after each message, bos first.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def llama_tok(tiny_model_dir):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    return t


@pytest.fixture(scope="module")
def bare_tok(tiny_model_dir):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = None
    return t


# ------------------------------------------------------------------------------ expected renderings
# Built here by hand from the layouts, independent of data/chat.py: a list of (text, trainable).


def chatml_segments(messages):
    segs, pending = [], ""
    for m in messages:
        if m["role"] == "assistant":
            segs.append((pending + "<|im_start|>assistant\n", False))
            segs.append((m["content"] + "<|im_end|>\n", True))
            pending = ""
        else:
            pending += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if pending:
        segs.append((pending, False))
    return segs


def llama3_segments(messages, bos):
    segs, pending = [], bos
    for m in messages:
        if m["role"] == "assistant":
            segs.append((pending + "<|start_header_id|>assistant<|end_header_id|>\n\n", False))
            segs.append((m["content"].strip() + "<|eot_id|>", True))
            pending = ""
        else:
            pending += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    if pending:
        segs.append((pending, False))
    return segs


def expected_tokens(tokenizer, segments):
    """Tokenize each segment alone: every token then belongs to exactly one segment."""
    ids, mask = [], []
    for text, trainable in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(trainable)] * len(piece)
    return ids, mask


def masked_runs(tokenizer, ids, mask):
    """Decode each maximal run of trained-on tokens."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def assert_token_by_token(tokenizer, ids, mask, segments):
    full_text = "".join(t for t, _ in segments)
    # the exact tokens the model sees at inference: the whole text tokenized at once
    assert ids == tokenizer(full_text, add_special_tokens=False)["input_ids"]
    exp_ids, exp_mask = expected_tokens(tokenizer, segments)
    assert ids == exp_ids, "segment boundaries must fall on token boundaries for this check"
    assert len(mask) == len(ids)
    for i, (t, m, e) in enumerate(zip(ids, mask, exp_mask)):
        assert m == e, f"token {i} {tokenizer.decode([t])!r}: mask {m}, expected {e}"


# ------------------------------------------------------------------------------- default ChatML path


def test_single_turn_mask_token_by_token(tok):
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    ids, mask = render_conversation(SINGLE, tok)
    assert_token_by_token(tok, ids, mask, chatml_segments(SINGLE))
    assert masked_runs(tok, ids, mask) == [SINGLE[1]["content"] + "<|im_end|>\n"]
    assert mask[0] == 0 and mask[-1] == 1
    # everything not trained on is exactly the prompt a server would send
    first = mask.index(1)
    assert tok.decode(ids[:first], skip_special_tokens=False) == render_prompt(SINGLE[:1], tok)


def test_three_turn_chat_with_system_mask_token_by_token(tok):
    ids, mask = render_conversation(MULTI, tok)
    assert_token_by_token(tok, ids, mask, chatml_segments(MULTI))
    assistants = [m["content"] for m in MULTI if m["role"] == "assistant"]
    assert masked_runs(tok, ids, mask) == [c + "<|im_end|>\n" for c in assistants]
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
    for m in MULTI:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    for c in assistants:
        assert c not in untrained


def test_default_layout_matches_the_tokenizer_template(tok):
    ids, _ = render_conversation(MULTI, tok)
    text = tok.apply_chat_template(MULTI, tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert "".join(t for t, _ in render_segments(MULTI, tok)) == text


def test_tokenizer_without_template_uses_default_chatml(bare_tok, tok):
    assert not bare_tok.chat_template
    ids, mask = render_conversation(MULTI, bare_tok)
    assert (ids, mask) == render_conversation(MULTI, tok)
    assert_token_by_token(bare_tok, ids, mask, chatml_segments(MULTI))
    assert render_segments(MULTI, None) == chatml_segments(MULTI)  # no tokenizer at all: same layout


def test_end_marker_is_one_special_token_and_trained_on(tok):
    ids, mask = render_conversation(SINGLE, tok)
    end_id = tok.convert_tokens_to_ids(IM_END)
    positions = [i for i, t in enumerate(ids) if t == end_id]
    assert len(positions) == 2  # user turn and assistant turn
    assert mask[positions[0]] == 0 and mask[positions[1]] == 1


def test_trailing_user_turn_is_not_trained(tok):
    msgs = SINGLE + [{"role": "user", "content": "One more thing"}]
    ids, mask = render_conversation(msgs, tok)
    assert_token_by_token(tok, ids, mask, chatml_segments(msgs))
    assert mask[-1] == 0


def test_unicode_content(tok):
    msgs = [{"role": "user", "content": "Grüße aus Köln — 你好 ✓"}, {"role": "assistant", "content": "Merci ! Ça marche 👍"}]
    ids, mask = render_conversation(msgs, tok)
    assert masked_runs(tok, ids, mask) == ["Merci ! Ça marche 👍<|im_end|>\n"]


# ---------------------------------------------------------------------------- custom Jinja template


def test_custom_llama3_template_single_turn(llama_tok):
    ids, mask = render_conversation(SINGLE, llama_tok, chat_template=LLAMA3_TEMPLATE)
    segs = llama3_segments(SINGLE, llama_tok.bos_token)
    assert "".join(t for t, _ in segs) == llama_tok.apply_chat_template(SINGLE, chat_template=LLAMA3_TEMPLATE, tokenize=False)
    assert_token_by_token(llama_tok, ids, mask, segs)
    assert masked_runs(llama_tok, ids, mask) == [SINGLE[1]["content"] + "<|eot_id|>"]
    assert ids[0] == llama_tok.bos_token_id and mask[0] == 0


def test_custom_llama3_template_three_turns_with_system(llama_tok):
    ids, mask = render_conversation(MULTI, llama_tok, chat_template=LLAMA3_TEMPLATE)
    assert_token_by_token(llama_tok, ids, mask, llama3_segments(MULTI, llama_tok.bos_token))
    # the template trims content, so the leading space of the second answer is not trained on
    assert masked_runs(llama_tok, ids, mask) == [m["content"].strip() + "<|eot_id|>" for m in MULTI if m["role"] == "assistant"]
    headers = [i for i, t in enumerate(ids) if t == llama_tok.convert_tokens_to_ids("<|start_header_id|>")]
    assert len(headers) == len(MULTI)
    assert all(mask[i] == 0 for i in headers)


def test_config_template_overrides_the_tokenizers(llama_tok, tok):
    with_override = render_conversation(MULTI, llama_tok, chat_template=LLAMA3_TEMPLATE)
    own = render_conversation(MULTI, llama_tok)  # the tokenizer's own (ChatML) template
    assert with_override != own
    assert masked_runs(llama_tok, *own) == [m["content"] + "<|im_end|>\n" for m in MULTI if m["role"] == "assistant"]


def test_tokenizer_own_jinja_template_is_used(tiny_model_dir):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    t.chat_template = LLAMA3_TEMPLATE
    ids, mask = render_conversation(SINGLE, t)
    assert_token_by_token(t, ids, mask, llama3_segments(SINGLE, t.bos_token))


def test_template_that_rewrites_earlier_turns_is_an_error(tok):
    # the message count is printed first, so a longer conversation does not start with a shorter one's text
    bad = "{{ messages | length }}" + DEFAULT_CHAT_TEMPLATE
    with pytest.raises(TemplateError, match="does not render a conversation as a sequence of prefixes"):
        render_conversation(MULTI, tok, chat_template=bad)


def test_jinja_template_needs_a_tokenizer():
    with pytest.raises(TemplateError, match="needs a tokenizer"):
        render_segments(SINGLE, None, chat_template=LLAMA3_TEMPLATE)


def test_render_prompt_ends_with_the_generation_prompt(tok, llama_tok):
    assert render_prompt(SINGLE[:1], tok) == "<|im_start|>user\nHow do I reset my laptop password?<|im_end|>\n<|im_start|>assistant\n"
    p = render_prompt(SINGLE[:1], llama_tok, chat_template=LLAMA3_TEMPLATE)
    assert p.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


# --------------------------------------------------------------------------------------- truncation

def _len(tok, msgs):
    return len(render_conversation(msgs, tok)[0])


@pytest.mark.parametrize("policy", ["drop_oldest_turns", "truncate_end", "reject"])
def test_fit_conversation_that_fits_is_unchanged(tok, policy):
    full = render_conversation(MULTI, tok)
    ids, mask, cut, why = fit_conversation(MULTI, tok, len(full[0]), policy)
    assert (ids, mask, cut, why) == (full[0], full[1], False, "")


def test_fit_reject_policy(tok):
    n = _len(tok, MULTI)
    ids, mask, cut, why = fit_conversation(MULTI, tok, n - 1, "reject")
    assert (ids, mask, cut) == (None, None, False)
    assert why == f"{n} tokens > max_seq_length {n - 1} (truncation: reject)"


def test_fit_truncate_end_cuts_the_tail(tok):
    full_ids, full_mask = render_conversation(MULTI, tok)
    limit = len(full_ids) - 7
    ids, mask, cut, why = fit_conversation(MULTI, tok, limit, "truncate_end")
    assert cut is True and why == ""
    assert ids == full_ids[:limit] and mask == full_mask[:limit]


def test_fit_truncate_end_with_no_assistant_token_left_is_rejected(tok):
    full_ids, full_mask = render_conversation(MULTI, tok)
    before_first_answer = full_mask.index(1)
    ids, mask, cut, why = fit_conversation(MULTI, tok, before_first_answer, "truncate_end")
    assert ids is None and mask is None and cut is False
    assert why == f"{len(full_ids)} tokens; cutting to {before_first_answer} leaves no assistant token"
    # one more token and the first answer's first token is in
    ids, mask, cut, _ = fit_conversation(MULTI, tok, before_first_answer + 1, "truncate_end")
    assert cut and sum(mask) == 1


def test_fit_drop_oldest_turns_keeps_system_and_latest_exchanges(tok):
    system, ex2, ex3 = MULTI[0], MULTI[3:5], MULTI[5:7]
    last_two = [system] + ex2 + ex3
    limit = _len(tok, last_two)
    assert limit < _len(tok, MULTI)
    ids, mask, cut, why = fit_conversation(MULTI, tok, limit, "drop_oldest_turns")
    assert cut is True and why == ""
    assert (ids, mask) == render_conversation(last_two, tok)
    # one token less: only the last exchange fits, the system message stays
    ids, mask, cut, _ = fit_conversation(MULTI, tok, limit - 1, "drop_oldest_turns")
    assert (ids, mask) == render_conversation([system] + ex3, tok)
    assert cut is True
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\n" + system["content"])


def test_fit_drop_oldest_turns_without_system(tok):
    msgs = MULTI[1:]
    limit = _len(tok, msgs[-2:])
    ids, mask, cut, _ = fit_conversation(msgs, tok, limit, "drop_oldest_turns")
    assert (ids, mask, cut) == (*render_conversation(msgs[-2:], tok), True)


def test_fit_drop_oldest_turns_when_the_last_exchange_alone_is_too_long(tok):
    n = _len(tok, MULTI)
    smallest = _len(tok, [MULTI[0]] + MULTI[5:7])
    ids, mask, cut, why = fit_conversation(MULTI, tok, smallest - 1, "drop_oldest_turns")
    assert (ids, mask, cut) == (None, None, False)
    assert why == f"{n} tokens > max_seq_length {smallest - 1}, and {smallest} after dropping the oldest turns"


def test_fit_single_exchange_cannot_drop_anything(tok):
    n = _len(tok, SINGLE)
    ids, _, _, why = fit_conversation(SINGLE, tok, n - 1, "drop_oldest_turns")
    assert ids is None
    assert why == f"{n} tokens > max_seq_length {n - 1}, and {n} after dropping the oldest turns"


def test_fit_uses_a_given_rendering(tok):
    rendered = render_conversation(SINGLE, tok)
    assert fit_conversation(SINGLE, tok, 10_000, "reject", rendered=rendered)[:2] == rendered
