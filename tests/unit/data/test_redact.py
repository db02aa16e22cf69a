"""PII redaction on realistic support text: what must go, what must stay, and the counts per kind."""
import pytest

from rayft.data.redact import PII_KINDS, luhn_ok, redact, redact_messages


def counts(**kw):
    out = {k: 0 for k in PII_KINDS}
    out.update(kw)
    return out


def test_kinds():
    assert set(PII_KINDS) == {"email", "phone", "card", "ipv4"}


# ------------------------------------------------------------------------------------------- email


def test_emails_in_a_support_row():
    text = "Hi, I'm Jane (jane.doe@example.com). Please cc it-help+vpn@northwind-labs.co.uk and JOHN_O@Mail.Example.ORG."
    out, c = redact(text)
    assert out == "Hi, I'm Jane ([EMAIL]). Please cc [EMAIL] and [EMAIL]."
    assert c == counts(email=3)


@pytest.mark.parametrize("text", ["Mention @jane in the channel", "user@localhost is not routable", "a @ b.com", "email me at"])
def test_not_emails(text):
    assert redact(text) == (text, counts())


# ------------------------------------------------------------------------------------------- phone


@pytest.mark.parametrize("phone", [
    "+1 415-555-0134",
    "(415) 555-0134",
    "+1 (415) 555-0134",
    "415.555.0134",
    "415-555-0134",
    "+44 20 7946 0958",
    "020 7946 0958",
    "+33 12 34 56 78",
    "+49-30-1234-5678",
])
def test_phone_styles(phone):
    text = f"Call me on {phone} after 5pm."
    out, c = redact(text)
    assert out == "Call me on [PHONE] after 5pm."
    assert c == counts(phone=1)


def test_phone_at_end_of_sentence_and_in_parentheses():
    out, c = redact("Reach the desk at +1 415-555-0134. Backup line (020 7946 0958).")
    assert out == "Reach the desk at [PHONE]. Backup line ([PHONE])."
    assert c == counts(phone=2)


@pytest.mark.parametrize("text", [
    "Your ticket 4821-99 was closed.",  # short numbers
    "Extension 12-34 or room 3.14",
    "The office opens 9:00-17:30.",
    "We had 1,234,567 requests in 2023.",
    "Order 4155550134 shipped",  # a bare number without separators is not read as a phone
])
def test_short_or_bare_numbers_are_not_phones(text):
    assert redact(text) == (text, counts())


# -------------------------------------------------------------------------------------------- card


def test_luhn():
    assert luhn_ok("4111111111111111")
    assert luhn_ok("5555555555554444")
    assert luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")
    assert not luhn_ok("1234567812345678")


@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5555 5555 5555 4444", "3782 822463 10005"])
def test_luhn_valid_cards_are_redacted(card):
    out, c = redact(f"My card {card} was charged twice.")
    assert out == "My card [CARD] was charged twice."
    assert c == counts(card=1)


@pytest.mark.parametrize("number", ["4111 1111 1111 1112", "1234-5678-1234-5678", "1234567812345678"])
def test_luhn_invalid_numbers_are_kept_and_not_counted(number):
    text = f"Reference {number} on the invoice."
    out, c = redact(text)
    assert out == text
    assert c["card"] == 0


# -------------------------------------------------------------------------------------------- ipv4


def test_ipv4_addresses():
    out, c = redact("VPN gateway 10.20.30.40 rejects 192.168.0.1, and 255.255.255.0 is the mask.")
    assert out == "VPN gateway [IPV4] rejects [IPV4], and [IPV4] is the mask."
    assert c == counts(ipv4=3)


def test_ipv4_at_the_end_of_a_sentence():
    out, c = redact("My laptop's IP is 10.0.0.5. It cannot reach 172.16.4.20.")
    assert out == "My laptop's IP is [IPV4]. It cannot reach [IPV4]."
    assert c == counts(ipv4=2)


@pytest.mark.parametrize("text", [
    "Update to Northwind Ledger 2.14.3 before Friday.",
    "Python 3.11.4 and node v18.17.1 are installed.",
    "Windows build 10.0.19045.2965 needs the patch.",
    "Not an address: 256.1.1.1 or 1.2.3 or 10.0.0",
    "Version 1.2.3.4.5 is a five-part version.",
])
def test_versions_and_out_of_range_quads_are_not_ipv4(text):
    assert redact(text) == (text, counts())


# ------------------------------------------------------------------------------------------- dates


@pytest.mark.parametrize("text", [
    "Leave starts 2024-03-05 and ends 2024-03-12.",
    "Submitted on 05/03/2024, approved 12.03.2024.",
    "The meeting is on 2024-03-05 14:00 in room B.",
    "Your laptop was shipped 15.01.2024 10:30 by courier.",
    "Logged at 2024/03/05 09:15:22 UTC.",
    "Timestamp 2024-03-05T14:00:00Z",
    "Hours: 9:00 to 17:30, Monday to Friday.",
])
def test_dates_and_times_are_not_redacted(text):
    assert redact(text) == (text, counts())


# ----------------------------------------------------------------------------------- mixed, messages


def test_mixed_row_counts_each_kind():
    text = ("I'm jane.doe@example.com, card 4111 1111 1111 1111 (not 4111 1111 1111 1112), laptop at 10.20.30.40 "
            "on release 2.14.3, call +1 415-555-0134 or (415) 555-0199 before 2024-03-05.")
    out, c = redact(text)
    assert out == ("I'm [EMAIL], card [CARD] (not 4111 1111 1111 1112), laptop at [IPV4] "
                   "on release 2.14.3, call [PHONE] or [PHONE] before 2024-03-05.")
    assert c == counts(email=1, card=1, ipv4=1, phone=2)


def test_text_without_pii_is_unchanged():
    text = "Install NorthGate VPN from the Software Center, then sign in with single sign-on."
    assert redact(text) == (text, counts())


def test_redact_messages_sums_over_messages_and_keeps_roles():
    msgs = [
        {"role": "system", "content": "You are the helpdesk."},
        {"role": "user", "content": "My email is a.b@example.com and my IP 10.1.2.3"},
        {"role": "assistant", "content": "Thanks. I will call +44 20 7946 0958 or write to c.d@example.org."},
    ]
    out, c = redact_messages(msgs)
    assert [m["role"] for m in out] == ["system", "user", "assistant"]
    assert out[0] == msgs[0]
    assert out[1]["content"] == "My email is [EMAIL] and my IP [IPV4]"
    assert out[2]["content"] == "Thanks. I will call [PHONE] or write to [EMAIL]."
    assert c == counts(email=2, ipv4=1, phone=1)
    assert msgs[1]["content"].startswith("My email is a.b@")  # the input is not modified
