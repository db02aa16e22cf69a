#!/usr/bin/env python3
"""Deterministic generator for the rayft example data in examples/data/.

    python3 examples/data/make_sample_data.py

Writes support_qa.json, chats.csv and kb.jsonl next to this script. Standard library only,
Python 3.10+. All randomness comes from one random.Random(1234), so every run writes
byte-identical files. Everything is fictional: the company "Northwind Labs", its internal
tools, its product "Northwind Ledger", the people, offices and error codes.

Good rows hold no email addresses, phone numbers, card numbers or IP addresses, except the
three PII rows listed below (reserved/test values: example.com, 555-01xx, the Visa test card,
a private IPv4). The script checks this, and that good rows are unique after whitespace
normalisation, before it writes anything.

Deliberately bad or special rows, with the reason a validator should give
(positions are 1-based):

support_qa.json -- element index in the JSON array (165 elements: 160 good + 5 bad)
    #12   PII: email jane.doe@example.com in the question     -> kept (good row); redacted by redact_pii
    #27   "answer" is ""                                      -> empty_content
    #41   identical copy of element #9                        -> duplicate
    #58   no "answer" key at all                              -> missing_field
    #73   PII: phone +1 415-555-0134 in the answer            -> kept (good row); redacted by redact_pii
    #88   "answer" is whitespace only                         -> empty_content
    #104  copy of element #66 differing only in whitespace    -> duplicate
    #121  PII: card 4111 1111 1111 1111 + IPv4 10.20.30.40    -> kept (good row); redacted by redact_pii

chats.csv -- data row, header excluded (96 data rows: 90 good + 6 bad)
    #14   messages cell is truncated, not valid JSON          -> unparsable_json
    #29   a message with role "moderator"                     -> unknown_role
    #43   system + user only, no assistant message            -> no_assistant_turn
    #57   two user messages in a row                          -> wrong_turn_order
    #70   a message with role "tool" that answers no call      -> orphan_tool_result
    #84   an assistant message with empty content             -> empty_content

kb.jsonl -- physical line number, blank line included (126 lines: 120 good rows + 5 bad rows + 1 blank)
    #18   truncated JSON object                               -> unparsable_json
    #35   a JSON array (holding one object), not an object    -> wrong_type
    #51   raw bytes b"\\xff\\xfe" inside the "output" string   -> undecodable_text
    #64   blank line                                          -> (skipped, not a row)
    #80   "output" is ~3000 words of repeated text            -> too_long (at max_seq_length 512)
    #97   byte-identical copy of line #22                     -> duplicate
"""
from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent
RNG = random.Random(1234)

N_QA_GOOD = 160
N_CHAT_GOOD = 90
N_KB_GOOD = 120

# ---------------------------------------------------------------------------------------------
# Fictional world
# ---------------------------------------------------------------------------------------------

NAMES = [
    "Avery", "Bram", "Celia", "Dario", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonah",
    "Kaia", "Luca", "Mirela", "Nils", "Odette", "Pavel", "Quinn", "Rosa", "Soren", "Talia",
    "Umar", "Vera", "Wes", "Yara",
]
OFFICES = ["Ashford", "Brightwater", "Cedar Point", "Dunmore", "Eastvale"]
TEAMS = ["finance", "design", "sales", "support", "engineering", "marketing", "legal", "operations"]
MODELS = ["NW-13 Flex", "NW-14 Air", "NW-16 Pro"]
DEVICES = ["laptop", "home desktop", "tablet"]
PLACES = ["home", "a hotel", "a cafe", "a client site", "the airport"]

LEAVE = {
    "annual leave": (
        "25 days of annual leave a year",
        "Submit it at least two weeks ahead so your manager can approve it.",
    ),
    "sick leave": (
        "up to 10 paid sick days a year",
        "Log it on your first day away; a doctor's note is needed after three days in a row.",
    ),
    "parental leave": (
        "16 weeks of fully paid parental leave",
        "Tell HR at least eight weeks before your planned start date.",
    ),
    "bereavement leave": (
        "5 paid days of bereavement leave for each loss",
        "Log it when you can; no notice period applies.",
    ),
    "volunteer leave": (
        "2 paid volunteer days a year",
        "Submit it one week ahead and name the charity you will help.",
    ),
}

EXPENSES = {
    "a hotel stay": "Hotels are covered up to $180 a night.",
    "meals while travelling": "Meals are covered up to $40 a day at home and $60 a day abroad.",
    "a client dinner": "Client dinners are covered up to $75 per person with manager approval.",
    "a taxi": "Taxis are covered when no train or bus is practical.",
    "a conference ticket": "Conference tickets are covered if your manager approves before you book.",
    "home office equipment": "Home office equipment is covered once, up to $300.",
    "a train ticket": "Standard class train tickets are always covered.",
}

VPN_CODES = {
    "NG-401": ("your sign-in token expired", "Sign out of NorthGate VPN and sign in again."),
    "NG-503": ("the gateway is busy", "Wait a minute, then pick another gateway from the list."),
    "NG-112": ("the client is out of date", "Update NorthGate VPN from the Software Center and restart it."),
    "NG-207": (
        "your device failed the health check",
        "Install pending updates and turn on disk encryption, then try again.",
    ),
}

# (as in "my X password", as in "locked out of X", as in "works for X" in a reply)
SYSTEMS = [
    ("single sign-on", "single sign-on", "single sign-on"),
    ("laptop", "my laptop", "your laptop"),
    ("People Hub", "People Hub", "People Hub"),
    ("mailbox", "my mailbox", "your mailbox"),
]
PARTS = ["screen", "keyboard", "battery", "trackpad", "charger"]
APPS = ["a PDF editor", "the screen recorder", "a diagram tool", "the Python runtime", "a code editor"]

LEDGER_TASKS = {
    "create an invoice": "Go to Sales > Invoices and click New invoice.",
    "set up a recurring invoice": "Open the invoice, click Repeat and choose how often it is sent.",
    "connect my bank account": "Go to Banking > Bank feeds, click Add bank and follow the sign-in steps.",
    "export transactions to CSV": "Go to Reports > Transactions, set the date range and click Export CSV.",
    "invite a new user": "Go to Settings > Users, click Invite user and pick a role.",
    "change the base currency": "Go to Settings > Company and pick the new base currency before you post anything.",
    "reconcile a bank statement": "Go to Banking, open the account and match each statement line to a transaction.",
    "add a tax rate": "Go to Settings > Tax rates and click Add rate.",
    "turn on two-factor sign-in": "Go to Profile > Security and click Enable two-factor.",
    "see the audit log": "Go to Settings > Audit log to see who changed what and when.",
}
LEDGER_PLANS = {
    "Starter": ("$12", "up to 2 users and 50 invoices a month"),
    "Growth": ("$29", "up to 10 users, bank feeds and multi-currency"),
    "Scale": ("$59", "unlimited users, the audit log and priority support"),
}
LEDGER_ROLES = {
    "Owner": "An Owner can do everything, including billing and closing the company file.",
    "Admin": "An Admin can manage users and settings but cannot change billing.",
    "Bookkeeper": "A Bookkeeper can post transactions, reconcile accounts and run reports.",
    "Viewer": "A Viewer can read reports and invoices but cannot change anything.",
}

CATEGORIES = ["hr_leave", "hr_expenses", "hr_onboarding", "it_vpn", "it_password", "it_laptop", "product"]


def pick(seq):
    return RNG.choice(list(seq))


# ---------------------------------------------------------------------------------------------
# Intents: each returns (question, answer) for one category, filled from the slots above.
# ---------------------------------------------------------------------------------------------


def hr_leave() -> tuple[str, str]:
    leave = pick(LEAVE)
    amount, notice = LEAVE[leave]
    kind = RNG.randrange(4)
    if kind == 0:
        q = pick(["How many days of {l} do I get?", "What is my {l} allowance?", "How much {l} am I entitled to?"])
        a = f"Full-time staff get {amount}. Part-time staff get a pro-rated amount."
    elif kind == 1:
        q = pick(["How do I request {l}?", "Where do I book {l}?", "What is the process for taking {l}?"])
        a = f"Open People Hub, go to Time Off and choose {leave}. {notice}"
    elif kind == 2:
        q = pick(["Can I carry over unused annual leave?", "Do unused holiday days roll over?",
                  "What happens to my unused annual leave at year end?"])
        a = "You can carry over up to 5 unused days of annual leave. Carried days must be used by the end of March."
    else:
        q = pick(["Who approves my {l} request?", "How long does approval for {l} take?"])
        a = f"Your manager approves {leave} in People Hub, usually within two working days. You get a notification when it is decided."
    return q.format(l=leave), a


def hr_expenses() -> tuple[str, str]:
    item = pick(EXPENSES)
    limit = EXPENSES[item]
    kind = RNG.randrange(5)
    if kind == 0:
        q = pick(["How do I claim {i}?", "Can I expense {i}?", "Will the company pay me back for {i}?", "What is the limit for {i}?"])
        a = f"{limit} Submit the claim in People Hub under Expenses within 30 days, with a receipt."
    elif kind == 1:
        q = pick(["Do I need a receipt for {i}?", "Is a receipt required when I claim {i}?"])
        a = "Yes, a receipt is needed for anything over $25. Take a photo of it and attach it to the claim."
    elif kind == 2:
        q = pick(["I lost the receipt for {i}. What should I do?", "What if I have no receipt for {i}?"])
        a = "Fill in the missing receipt form in People Hub and ask your manager to confirm the cost. You can do this twice a year."
    elif kind == 3:
        q = pick(["When will I be paid back for {i}?", "How long does reimbursement for {i} take?"])
        a = "Approved claims are paid with the next payroll run, usually within 10 working days."
    else:
        q = pick(["Is there a deadline for expense claims?", "How late can I submit an expense claim?"])
        a = "Submit claims within 30 days of the purchase. Later claims need approval from finance."
    return q.format(i=item), a


def hr_onboarding() -> tuple[str, str]:
    office = pick(OFFICES)
    kind = RNG.randrange(5)
    if kind == 0:
        q = pick(["Where do I go on my first day in {o}?", "What time does my first day start in {o}?",
                  "What should I bring on my first day at the {o} office?"])
        a = f"Come to the {office} reception at 9:00 with a photo ID. Your manager and onboarding buddy will meet you there."
    elif kind == 1:
        q = pick(["Will I get an onboarding buddy?", "What does an onboarding buddy do?"])
        a = "Every new hire gets a buddy from their team for the first 90 days to answer everyday questions. Your manager shares the name before you start."
    elif kind == 2:
        q = pick(["When do I need to finish security training?", "Is the security training mandatory?"])
        a = "Security training is mandatory. Complete it in People Hub within 7 days of your start date."
    elif kind == 3:
        q = pick(["When do I enroll in benefits?", "How do I sign up for health insurance?"])
        a = "Enroll in benefits in People Hub within 30 days of starting. If you miss the window, wait for the next open enrollment."
    else:
        q = pick(["Will my laptop be ready on my first day in {o}?", "How do I get my office badge in {o}?"])
        if "badge" in q:
            a = f"Reception in {office} takes your photo on day one and prints the badge on the spot."
        else:
            a = f"Yes. IT prepares your laptop before your start date and hands it over at the {office} reception."
    return q.format(o=office), a


def it_vpn() -> tuple[str, str]:
    kind = RNG.randrange(4)
    if kind == 0:
        dev = pick(DEVICES)
        q = pick(["How do I connect to the VPN from home?", "How do I set up NorthGate VPN on my {d}?",
                  "I need VPN access on my {d}. How do I get it?"]).format(d=dev)
        a = "Install NorthGate VPN from the Software Center, then sign in with single sign-on and approve the prompt in your authenticator app."
    elif kind == 1:
        code = pick(VPN_CODES)
        meaning, fix = VPN_CODES[code]
        q = pick(["NorthGate VPN shows error {c}. What does it mean?", "I keep getting {c} when I connect to the VPN.",
                  "What should I do about VPN error {c}?"]).format(c=code)
        a = f"{code} means {meaning}. {fix}"
    elif kind == 2:
        place = pick(PLACES)
        q = pick(["My VPN keeps disconnecting when I work from {p}.", "Why does the VPN drop at {p}?"]).format(p=place)
        a = "Switch NorthGate VPN to the TCP protocol under Settings and keep the laptop plugged in. If it still drops, open an IT ticket with the time it happened."
    else:
        office = pick(OFFICES)
        q = pick(["Do I need the VPN in the {o} office?", "Should I use the VPN when I am in {o}?"]).format(o=office)
        a = "No. In the office you are already on the company network; use the VPN only when working remotely."
    return q, a


def it_password() -> tuple[str, str]:
    s_adj, s_mine, s_yours = pick(SYSTEMS)
    kind = RNG.randrange(4)
    if kind == 0:
        q = pick(["How do I reset my {s} password?", "I forgot my {s} password.", "How can I change my {s} password?"])
        a = f"Go to the ID portal, choose Forgot password and verify with your authenticator app. The new password works for {s_yours} within five minutes."
    elif kind == 1:
        q = pick(["My {s} account is locked after too many attempts.", "I am locked out of {m}."])
        a = "Accounts lock after 5 failed attempts and unlock on their own after 15 minutes. If you need access sooner, open an urgent IT ticket."
    elif kind == 2:
        q = pick(["What are the password rules for {m}?", "How long must my {s} password be?"])
        a = "Passwords need at least 14 characters and cannot reuse your last 5 passwords. They expire every 90 days."
    else:
        q = pick(["I got a new phone. How do I move my authenticator app?",
                  "How do I register a new phone for sign-in approvals?"])
        a = "Open the ID portal on your laptop, choose Security devices and register the new phone. Remove the old phone when you are done."
    return q.format(s=s_adj, m=s_mine), a


def it_laptop() -> tuple[str, str]:
    model = pick(MODELS)
    kind = RNG.randrange(4)
    if kind == 0:
        part = pick(PARTS)
        q = pick(["The {p} on my {m} is broken.", "My {m} {p} stopped working. What do I do?"]).format(p=part, m=model)
        a = f"Open a hardware ticket in the IT portal and mention the {part}. A loaner laptop is ready within one working day."
    elif kind == 1:
        q = pick(["When do I get a new laptop?", "How old must my {m} be before it is replaced?"]).format(m=model)
        a = "Laptops are replaced every three years. IT contacts you when yours is due."
    elif kind == 2:
        place = pick(PLACES)
        q = pick(["I lost my {m} at {p}.", "My {m} was stolen at {p}. What now?"]).format(m=model, p=place)
        a = "Report it to IT security within 24 hours through the IT portal. IT locks the device remotely and orders a replacement."
    else:
        app = pick(APPS)
        q = pick(["How do I install {a} on my {m}?", "Can I get {a} on my laptop?"]).format(a=app, m=model)
        a = f"Install {app} from the Software Center. If it is not listed, open a software ticket with your manager's approval."
    return q, a


def product() -> tuple[str, str]:
    kind = RNG.randrange(4)
    if kind == 0:
        task = pick(LEDGER_TASKS)
        q = pick(["How do I {t} in Northwind Ledger?", "Where can I {t} in Northwind Ledger?",
                  "Is it possible to {t} in Northwind Ledger?"]).format(t=task)
        a = LEDGER_TASKS[task]
    elif kind == 1:
        plan = pick(LEDGER_PLANS)
        price, feats = LEDGER_PLANS[plan]
        q = pick(["How much does the {p} plan cost?", "What is included in the {p} plan?"]).format(p=plan)
        a = f"The {plan} plan costs {price} per month and includes {feats}."
    elif kind == 2:
        q = pick(["Is there a free trial of Northwind Ledger?", "Can I try Northwind Ledger before I pay?"])
        a = "Yes, every plan has a 30-day free trial. You can upgrade or cancel at any time."
    else:
        role = pick(LEDGER_ROLES)
        q = pick(["What can a {r} do in Northwind Ledger?", "What does the {r} role allow?"]).format(r=role)
        a = LEDGER_ROLES[role]
    return q, a


INTENTS = {
    "hr_leave": hr_leave,
    "hr_expenses": hr_expenses,
    "hr_onboarding": hr_onboarding,
    "it_vpn": it_vpn,
    "it_password": it_password,
    "it_laptop": it_laptop,
    "product": product,
}

QA_PREFIXES = ["", "", "", "Hi, ", "Quick question: ", "Hello. ", "I'm {n} from {t}. ", "I work on the {t} team. "]


def personalise(q: str, a: str) -> tuple[str, str]:
    """Optionally add a short context prefix; a named asker gets a named greeting."""
    prefix = pick(QA_PREFIXES)
    if not prefix:
        return q, a
    name, team = pick(NAMES), pick(TEAMS)
    q = prefix.format(n=name, t=team) + q
    if "{n}" in prefix:
        a = f"Hi {name}. " + a
    return q, a


# ---------------------------------------------------------------------------------------------
# Checks shared by all files
# ---------------------------------------------------------------------------------------------

PII_PATTERNS = [
    re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+"),                     # email
    re.compile(r"\+?\d[\d ().-]{5,}\d"),                         # phone-ish / card-ish digit runs
    re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b"),       # IPv4
]


def norm(s: str) -> str:
    return " ".join(s.split())


def check_text(s: str, pii_ok: bool = False, max_words: int = 70) -> None:
    assert s.isascii(), s
    assert s.strip(), "empty text in a good row"
    assert len(s.split()) <= max_words, s
    if not pii_ok:
        for pat in PII_PATTERNS:
            assert not pat.search(s), f"accidental PII-like text: {s!r}"


SEEN_SINGLE_TURN: set[str] = set()  # normalised (user, assistant) pairs across support_qa and kb


def claim_single_turn(user: str, assistant: str, system: str = "") -> bool:
    key = "\x00".join([norm(system), norm(user), norm(assistant)])
    if key in SEEN_SINGLE_TURN:
        return False
    SEEN_SINGLE_TURN.add(key)
    return True


def place(good: list, specials: dict[int, object], total: int) -> list:
    """Interleave good rows with specials at fixed 1-based positions."""
    assert len(good) + len(specials) == total, (len(good), len(specials), total)
    it = iter(good)
    return [specials[i] if i in specials else next(it) for i in range(1, total + 1)]


# ---------------------------------------------------------------------------------------------
# 1. support_qa.json
# ---------------------------------------------------------------------------------------------

QA_TOTAL = 165
QA_DUP_EXACT = (41, 9)   # (position, copy of position)
QA_DUP_SPACES = (104, 66)
QA_PII_EMAIL, QA_PII_PHONE, QA_PII_CARD_IP = 12, 73, 121
QA_EMPTY, QA_MISSING, QA_BLANK = 27, 58, 88


def make_support_qa() -> list[dict]:
    n_plain = N_QA_GOOD - 3  # three PII rows are good rows too
    plain: list[dict] = []
    attempts = 0
    while len(plain) < n_plain:
        attempts += 1
        assert attempts < 20000, "template space too small"
        cat = CATEGORIES[len(plain) % len(CATEGORIES)]
        q, a = personalise(*INTENTS[cat]())
        if not claim_single_turn(q, a):
            continue
        check_text(q), check_text(a)
        plain.append({"question": q, "answer": a, "category": cat})

    pii = {
        QA_PII_EMAIL: {
            "question": "My manager said to send receipts to jane.doe@example.com. Is that right?",
            "answer": "No. Attach receipts to the claim in People Hub under Expenses instead of sending them by mail.",
            "category": "hr_expenses",
        },
        QA_PII_PHONE: {
            "question": "Who can I call about my parental leave?",
            "answer": "Call Jane Doe in HR on +1 415-555-0134, or open an HR ticket in People Hub.",
            "category": "hr_leave",
        },
        QA_PII_CARD_IP: {
            "question": "A customer paid with card 4111 1111 1111 1111 from IP 10.20.30.40 and it failed. Why?",
            "answer": "Northwind Ledger blocks payments flagged by the fraud check. Ask the customer to retry, or mark the invoice as paid by hand.",
            "category": "product",
        },
    }
    for row in pii.values():
        check_text(row["question"], pii_ok=True), check_text(row["answer"], pii_ok=True)
        assert claim_single_turn(row["question"], row["answer"])

    bad = {
        QA_EMPTY: {"question": "How do I request volunteer leave for a charity day?", "answer": "", "category": "hr_leave"},
        QA_MISSING: {"question": "Can I expense a parking ticket?", "category": "hr_expenses"},
        QA_BLANK: {"question": "Why does Northwind Ledger log me out after an hour?", "answer": "  \n\t  ", "category": "product"},
    }
    specials = {**pii, **bad}
    # Duplicates point at final positions, so lay out the rest first and fill them in afterwards.
    specials[QA_DUP_EXACT[0]] = None
    specials[QA_DUP_SPACES[0]] = None
    rows = place(plain, specials, QA_TOTAL)

    src = rows[QA_DUP_EXACT[1] - 1]
    assert src in plain
    rows[QA_DUP_EXACT[0] - 1] = dict(src)

    src = rows[QA_DUP_SPACES[1] - 1]
    assert src in plain
    words_q, words_a = src["question"].split(" "), src["answer"].split(" ")
    q2 = " ".join(words_q[:2]) + "   " + " ".join(words_q[2:4]) + "\n" + " ".join(words_q[4:])
    a2 = " ".join(words_a[:3]) + "  \n " + " ".join(words_a[3:]) + "\n"
    spaced = {"question": q2, "answer": a2, "category": src["category"]}
    assert spaced != src and norm(q2) == norm(src["question"]) and norm(a2) == norm(src["answer"])
    rows[QA_DUP_SPACES[0] - 1] = spaced
    return rows


# ---------------------------------------------------------------------------------------------
# 2. chats.csv
# ---------------------------------------------------------------------------------------------

CHAT_TOTAL = 96
CHAT_BAD_JSON, CHAT_MODERATOR, CHAT_NO_ASSISTANT = 14, 29, 43
CHAT_WRONG_ORDER, CHAT_TOOL, CHAT_EMPTY_ASSISTANT = 57, 70, 84
CHANNELS = ["web", "slack", "mobile", "email"]

SYSTEM_PROMPTS = {
    "hr": "You are the Northwind Labs HR assistant. Answer briefly and politely.",
    "it": "You are the Northwind Labs IT helpdesk assistant. Keep answers short.",
    "product": "You are a support agent for Northwind Ledger. Keep answers short and friendly.",
}

CLOSINGS = [
    ("Thanks, that helps.", "You're welcome, {n}. Anything else I can help with?"),
    ("Great, that worked.", "Glad it is sorted, {n}. Have a good day."),
    ("Perfect, thank you.", "Happy to help, {n}."),
    ("Got it, thanks!", "Any time, {n}. Reach out if anything else comes up."),
]

# A vague opener the assistant must clarify, per category: (user, assistant)
CLARIFY = {
    "hr_leave": ("I have a question about time off.", "Sure, {n}. What would you like to know about leave?"),
    "hr_expenses": ("I have a question about an expense.", "Of course, {n}. What is your question?"),
    "hr_onboarding": ("I am starting next week.", "Welcome to Northwind Labs, {n}! What would you like to know?"),
    "it_vpn": ("I need help with the VPN.", "Sure, {n}. Can you tell me more?"),
    "it_password": ("I need help with a password.", "Let's sort it out, {n}. What exactly do you need?"),
    "it_laptop": ("I need help with my laptop.", "Sorry to hear that, {n}. What do you need help with?"),
    "product": ("I need help with Northwind Ledger.", "Happy to help, {n}. What are you trying to do?"),
}


def make_conversation() -> list[dict]:
    cat = CATEGORIES[RNG.randrange(len(CATEGORIES))]
    name = pick(NAMES)
    n_exchanges = RNG.choice([2, 2, 3, 3, 4])
    pairs: list[tuple[str, str]] = []
    if RNG.random() < 0.4:
        u, a = CLARIFY[cat]
        pairs.append((u, a.format(n=name)))
        pairs.append(INTENTS[cat]())  # the concrete question the clarification asked for
    else:
        q, a = INTENTS[cat]()
        if RNG.random() < 0.5:
            q = f"Hi, I'm {name}. " + q
        pairs.append((q, a))
    # a thank-you closing exchange, unless clarify + question already fill the chat
    want_closing = RNG.random() < 0.6 and len(pairs) < n_exchanges
    while len(pairs) < n_exchanges - (1 if want_closing else 0):
        q, a = INTENTS[cat]()
        if all(q != p[0] for p in pairs):
            pairs.append((q, a))
    if want_closing:
        u, a = pick(CLOSINGS)
        pairs.append((u, a.format(n=name)))
    msgs = []
    if RNG.random() < 0.35:
        msgs.append({"role": "system", "content": SYSTEM_PROMPTS[cat.split("_")[0]]})
    for u, a in pairs:
        msgs.append({"role": "user", "content": u})
        msgs.append({"role": "assistant", "content": a})
    return msgs


def make_chats() -> list[list[str]]:
    good: list[list[dict]] = []
    seen: set[str] = set()
    while len(good) < N_CHAT_GOOD:
        msgs = make_conversation()
        if sum(len(m["content"].split()) for m in msgs) > 120:
            continue
        key = json.dumps([[m["role"], norm(m["content"])] for m in msgs])
        if key in seen:
            continue
        seen.add(key)
        for m in msgs:
            check_text(m["content"])
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) // 2 <= 4
        good.append(msgs)
    good_cells = [json.dumps(m) for m in good]

    bad = {
        CHAT_BAD_JSON: '[{"role": "user", "content": "How do I reset my laptop password?"}, '
                       '{"role": "assistant", "content": "Go to the ID portal and choose Forg',
        CHAT_MODERATOR: json.dumps([
            {"role": "user", "content": "Can I carry over unused annual leave?"},
            {"role": "assistant", "content": "You can carry over up to 5 unused days of annual leave."},
            {"role": "moderator", "content": "This conversation was flagged for review."},
            {"role": "user", "content": "By when must I use them?"},
            {"role": "assistant", "content": "Carried days must be used by the end of March."},
        ]),
        CHAT_NO_ASSISTANT: json.dumps([
            {"role": "system", "content": SYSTEM_PROMPTS["hr"]},
            {"role": "user", "content": "Can I expense a taxi to the airport?"},
        ]),
        CHAT_WRONG_ORDER: json.dumps([
            {"role": "user", "content": "My laptop screen keeps flickering."},
            {"role": "user", "content": "It is the NW-14 Air I got last year."},
            {"role": "assistant", "content": "Open a hardware ticket in the IT portal and mention the screen."},
        ]),
        CHAT_TOOL: json.dumps([
            {"role": "user", "content": "Is my hardware ticket for the broken keyboard still open?"},
            {"role": "assistant", "content": "Let me check the ticket status for you."},
            {"role": "tool", "content": '{"ticket": "HW-2291", "status": "open", "loaner": "ready"}'},
            {"role": "assistant", "content": "Your ticket is still open, and a loaner laptop is ready at the IT desk."},
        ]),
        CHAT_EMPTY_ASSISTANT: json.dumps([
            {"role": "system", "content": SYSTEM_PROMPTS["product"]},
            {"role": "user", "content": "How do I add a tax rate in Northwind Ledger?"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Hello? Are you there?"},
            {"role": "assistant", "content": "Sorry! Go to Settings > Tax rates and click Add rate."},
        ]),
    }
    cells = place(good_cells, bad, CHAT_TOTAL)
    return [[f"nw-{i:04d}", pick(CHANNELS), cell] for i, cell in enumerate(cells, start=1)]


# ---------------------------------------------------------------------------------------------
# 3. kb.jsonl
# ---------------------------------------------------------------------------------------------

KB_LINES = 126
KB_TRUNCATED, KB_ARRAY, KB_BAD_UTF8, KB_BLANK, KB_TOO_LONG = 18, 35, 51, 64, 80
KB_DUP = (97, 22)

KB_SYSTEM = "You are the Northwind Labs knowledge base. Answer in one or two sentences."

KB_TOPICS = {
    "the annual leave policy": "Staff get 25 days of annual leave a year and can carry over up to 5 days. Requests go through People Hub at least two weeks ahead.",
    "the sick leave policy": "Staff get up to 10 paid sick days a year. A doctor's note is needed after three days in a row.",
    "the parental leave policy": "Parents get 16 weeks of fully paid leave. Tell HR at least eight weeks before the start date.",
    "the expense policy": "Claims go through People Hub within 30 days, with receipts for anything over $25. Approved claims are paid with the next payroll run.",
    "the travel policy": "Hotels are covered up to $180 a night and meals up to $40 a day at home. Book economy for flights under six hours.",
    "the first day for new hires": "New hires arrive at reception at 9:00 with a photo ID. Their laptop and badge are ready on day one.",
    "the onboarding buddy program": "Each new hire gets a buddy from their team for the first 90 days to answer everyday questions.",
    "security training for new staff": "New staff complete the security training in People Hub within 7 days of starting.",
    "remote access with NorthGate VPN": "Install NorthGate VPN from the Software Center and sign in with single sign-on. Use it only when working remotely.",
    "the password rules": "Passwords need at least 14 characters, cannot reuse the last 5 and expire every 90 days.",
    "account lockouts": "Accounts lock after 5 failed sign-in attempts and unlock after 15 minutes.",
    "the laptop refresh cycle": "Laptops are replaced every three years, and IT contacts you when yours is due.",
    "reporting a lost laptop": "Report a lost or stolen laptop to IT security within 24 hours so it can be locked remotely.",
    "Northwind Ledger plans": "Northwind Ledger has three plans: Starter at $12, Growth at $29 and Scale at $59 per month.",
    "the Northwind Ledger free trial": "Every Northwind Ledger plan starts with a 30-day free trial.",
    "user roles in Northwind Ledger": "Northwind Ledger has four roles: Owner, Admin, Bookkeeper and Viewer.",
}
KB_VERBS = ["Explain", "Summarize", "Briefly describe", "Give a short overview of"]

KB_TICKET_FMT = [
    "Ticket from {n} ({t}): {q}",
    "{q} - sent by {n}",
    "New ticket: {q}",
]
KB_CATEGORY_LABEL = {
    "hr_leave": "hr", "hr_expenses": "hr", "hr_onboarding": "hr",
    "it_vpn": "it", "it_password": "it", "it_laptop": "it", "product": "product",
}


def kb_row() -> dict:
    kind = RNG.randrange(5)
    if kind == 0:  # topic summary, no input
        topic = pick(KB_TOPICS)
        row = {"instruction": f"{pick(KB_VERBS)} {topic} at Northwind Labs.", "input": "", "output": KB_TOPICS[topic]}
    elif kind == 1:  # answer a question given as input
        cat = pick(CATEGORIES)
        q, a = INTENTS[cat]()
        instr = pick(["Answer this question from a Northwind Labs employee.",
                      "Reply to the employee using company policy.",
                      "Answer the question below in one or two sentences."])
        row = {"instruction": instr, "input": q, "output": a}
    elif kind == 2:  # classify a ticket
        cat = pick(CATEGORIES)
        q, _ = INTENTS[cat]()
        ticket = pick(KB_TICKET_FMT).format(n=pick(NAMES), t=pick(TEAMS), q=q)
        row = {"instruction": "Classify this ticket as hr, it or product. Reply with one word.", "input": ticket,
               "output": KB_CATEGORY_LABEL[cat]}
    elif kind == 3:  # product steps, no input
        task = pick(LEDGER_TASKS)
        instr = pick(["Explain how to {t} in Northwind Ledger.", "Write the steps to {t} in Northwind Ledger."])
        row = {"instruction": instr.format(t=task), "input": "", "output": LEDGER_TASKS[task]}
    else:  # rewrite an internal note as a reply
        cat = pick(CATEGORIES)
        _, a = INTENTS[cat]()
        name = pick(NAMES)
        row = {"instruction": f"Rewrite this helpdesk note as a friendly reply to {name}.",
               "input": "Note: " + a.split(". ")[0].rstrip(".") + ".",
               "output": f"Hi {name}, " + a[0].lower() + a[1:]}
    if RNG.random() < 0.12:
        row["system"] = KB_SYSTEM
    return row


def kb_bytes(obj) -> bytes:
    return json.dumps(obj).encode("ascii")


def make_kb() -> list[bytes]:
    good: list[bytes] = []
    while len(good) < N_KB_GOOD:
        row = kb_row()
        user = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
        if not claim_single_turn(user, row["output"], row.get("system", "")):
            continue
        for v in row.values():
            if v:
                check_text(v)
        good.append(kb_bytes(row))

    long_text = " ".join(["Every change to an invoice in Northwind Ledger is kept in the audit log."] * 215)
    specials: dict[int, bytes | None] = {
        KB_TRUNCATED: b'{"instruction": "Explain the parental leave policy at Northwind Labs.", "input": "", "output": "Parents get 16 weeks of fu',
        KB_ARRAY: kb_bytes([{"instruction": "Explain the sick leave policy at Northwind Labs.", "input": "",
                             "output": "Staff get up to 10 paid sick days a year."}]),
        KB_BAD_UTF8: b'{"instruction": "Describe the laptop refresh cycle.", "input": "", '
                     b'"output": "Laptops are replaced every \xff\xfe three years."}',
        KB_BLANK: b"",
        KB_TOO_LONG: kb_bytes({"instruction": "Quote the full Northwind Ledger audit log policy.", "input": "",
                               "output": long_text}),
        KB_DUP[0]: None,
    }
    lines = place(good, specials, KB_LINES)
    assert lines[KB_DUP[1] - 1] in good
    lines[KB_DUP[0] - 1] = lines[KB_DUP[1] - 1]
    return lines


# ---------------------------------------------------------------------------------------------


def main() -> None:
    qa = make_support_qa()
    chats = make_chats()
    kb = make_kb()

    with open(OUT_DIR / "support_qa.json", "w", encoding="ascii", newline="\n") as f:
        json.dump(qa, f, indent=2)
        f.write("\n")
    with open(OUT_DIR / "chats.csv", "w", encoding="ascii", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(["conversation_id", "channel", "messages"])
        w.writerows(chats)
    with open(OUT_DIR / "kb.jsonl", "wb") as f:
        f.write(b"".join(line + b"\n" for line in kb))

    print(f"support_qa.json: {len(qa)} elements ({N_QA_GOOD} good)")
    print(f"chats.csv: {len(chats)} data rows ({N_CHAT_GOOD} good)")
    print(f"kb.jsonl: {len(kb)} lines ({N_KB_GOOD} good rows)")


if __name__ == "__main__":
    main()
