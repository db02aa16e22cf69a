"""PII redaction: emails, phone numbers, Luhn-valid card numbers, IPv4 addresses.

Each match is replaced by a placeholder (`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IPV4]`) and counted per kind.
Cards run first so that a 16-digit card is not taken for a phone number.
"""
from __future__ import annotations

import re

PII_KINDS = ("email", "card", "ipv4", "phone")

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# Not followed by a digit or ".digit" (a longer dotted number), but a sentence's full stop may follow.
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\d|\.\d)")
# International or North-American style numbers with at least 9 digits; separators space, dot, dash.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])")
# A date (2024-03-05, 15.01.2024) that a phone match starts with: "2024-03-05 14:00" is a date and a time.
_DATE = re.compile(r"(?:(?:19|20)\d\d([-./])[0-3]?\d\1[0-3]?\d|[0-3]?\d([-./])[0-3]?\d\2(?:19|20)\d\d)(?!\d)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def redact(text: str) -> tuple[str, dict[str, int]]:
    counts = {k: 0 for k in PII_KINDS}

    def sub_email(m: re.Match) -> str:
        counts["email"] += 1
        return "[EMAIL]"

    def sub_card(m: re.Match) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            counts["card"] += 1
            return "[CARD]"
        return m.group(0)

    def sub_ip(m: re.Match) -> str:
        counts["ipv4"] += 1
        return "[IPV4]"

    def sub_phone(m: re.Match) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        if 9 <= len(digits) <= 15 and not _DATE.match(m.group(0)):
            counts["phone"] += 1
            return "[PHONE]"
        return m.group(0)

    if "@" in text:
        text = _EMAIL.sub(sub_email, text)
    text = _CARD.sub(sub_card, text)
    if "." in text:
        text = _IPV4.sub(sub_ip, text)
    text = _PHONE.sub(sub_phone, text)
    return text, counts


def redact_messages(messages: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Redact every message's text and the string values inside its tool-call arguments."""
    total = {k: 0 for k in PII_KINDS}

    def scrub(value):
        if isinstance(value, str):
            text, counts = redact(value)
            for k, v in counts.items():
                total[k] += v
            return text
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    out = []
    for m in messages:
        m = {**m, "content": scrub(m["content"])}
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": scrub(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out, total
