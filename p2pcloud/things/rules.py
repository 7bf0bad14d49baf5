"""Programmable things: rules as data, a tiny safe condition language, exactly-once handling.

Theory of operation
-------------------
A rule is one line of text stored in the thing's sub-cloud (collection ``rules``), so it
replicates to every owner device (DESIGN.md section 7; research/peers.md section 4 item 3:
deterministic evaluation over replicated state lets every device run the rules offline)::

    on reading_added if value > 80 and unit == "kg" do notify_owner("heavy"), append(alerts, value)
    on schedule daily at 07:30 +02:00 do notify_owner("water the plant")
    on message_received do forward(<52-character hashname>)

:func:`parse_rule` is a small tokenizer and recursive-descent parser (never ``eval``): names
must be fields of the rule's event, sizes and nesting depth are bounded, anything else is a
:class:`~p2pcloud.errors.RuleError`. :func:`evaluate` is a pure function of the rules and one
:class:`Event`: same input, same firings, on every device.

Exactly once, with several owner devices online (docs/things.md "exactly once"):

* Every event has a unique id: the ``id`` of its record in the ``events`` log (random, made
  where it happened) or, for schedules, ``schedule:<rule id>:<local date>`` (the same on every
  device, computed from the rule).
* Each (event) has an ordered list of *candidates*: the device where it originated first (none
  for schedules), then the cloud's rule hosts ranked by rendezvous hashing of
  ``SHA-256(event id | host)``. Candidate ``k`` may handle it from ``at + k * TAKEOVER_MS``.
* Handling a firing writes a *done-marker* ``done/<rule id>|<event id>`` into the sub-cloud in
  the same transaction as the rule's ``append`` writes, so internal effects and the marker
  travel in one delta. A candidate skips every firing whose marker it has merged. A device
  that comes back after a partition merges the markers first and skips what was done.
* Limits, honestly: when devices cannot sync for longer than ``TAKEOVER_MS`` the next
  candidate acts too (availability over coordination); both markers then merge into one
  multi-value field that shows the duplicate. A device that (re)starts waits ``SETTLE_MS``
  before handling work that became due while it was down, so its first sync can bring in the
  markers of whoever took over. External actions (notify, forward) run after the
  marker is written, so a crash between the two loses that notification rather than
  repeating it.

:class:`RuleRunner` packages this as a pure state machine for the Trio shell (``observe``,
``due``, ``complete``, ``get_timer``); :class:`HandlerRegistry` lets developers register Python
handlers for the same events (``@registry.on("reading_added")``), run under the same plan.
Pure: no I/O, no clock (``now_ms`` comes in).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from p2pcloud._core import Replica
from p2pcloud._crypto import is_hashname
from p2pcloud._ids import Hashname, SubCloudId
from p2pcloud._wire import Entropy, b32encode
from p2pcloud.cloud.membership import Membership
from p2pcloud.errors import RuleError
from p2pcloud.things import thing as _t

__all__ = [
    "ACTIONS",
    "EVENT_FIELDS",
    "EVENTS",
    "MAX_DEPTH",
    "MAX_RULE_TEXT",
    "MAX_RULES",
    "MAX_TOKENS",
    "SETTLE_MS",
    "TAKEOVER_MS",
    "Action",
    "Event",
    "Firing",
    "HandlerRegistry",
    "Rule",
    "RuleRunner",
    "Schedule",
    "add_rule",
    "candidates",
    "evaluate",
    "is_done",
    "load_rules",
    "parse_rule",
    "remove_rule",
    "rule_hosts",
    "schedule_events",
]

# -- vocabulary and limits --------------------------------------------------------------------

EVENT_FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "scanned": frozenset({"owner", "by", "finder"}),
    "reading_added": frozenset({"value", "unit", "kind", "by"}),
    "message_received": frozenset({"text", "contact", "length", "finder", "by"}),
    "schedule": frozenset({"weekday", "date", "time"}),
}
"""The events rules react to, and the fields a condition may name for each."""
EVENTS: Final = frozenset(EVENT_FIELDS)
ACTIONS: Final = frozenset({"notify_owner", "show_card", "append", "forward"})
EXTERNAL_ACTIONS: Final = frozenset({"notify_owner", "show_card", "forward"})

MAX_RULE_TEXT: Final = 1024  # characters: a rule is one line a person writes and reads
MAX_TOKENS: Final = 200  # bounds parser work per rule
MAX_DEPTH: Final = 12  # nested parentheses and nots: bounds parser and evaluator recursion
MAX_STRING: Final = 256  # characters in a string literal
MAX_ACTIONS: Final = 4  # actions per rule
MAX_RULES: Final = 128  # rules per thing: bounds the work one event causes
MAX_CATCHUP_DAYS: Final = 7
"""A device that was off longer runs only the last week's schedule occurrences: a daily
reminder from a month ago is noise, and the bound caps the work after a long sleep."""
TAKEOVER_MS: Final = 60_000
"""How long each candidate waits for the one before it (1 minute): long enough for a done
marker to sync between online devices, short enough that a notification is still timely."""
SETTLE_MS: Final = TAKEOVER_MS
"""After a (re)start, how long overdue firings wait for the first sync with the other devices
(whose done-markers would show the work was taken over meanwhile)."""
_DAY_MS: Final = 86_400_000

# -- tokens -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<offset>[+-]\d{2}:\d{2}(?![\w:]))
  | (?P<time>\d{2}:\d{2}(?![\w:]))
  | (?P<hashname>[a-z2-7]{52}(?![\w]))
  | (?P<number>-?\d{1,15}(?:\.\d{1,15})?(?![\w.]))
  | (?P<string>"(?:[^"\\\n]|\\["\\])*")
  | (?P<name>[a-z_][a-z0-9_]{0,63}(?![\w]))
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[(),])
""", re.VERBOSE)


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise RuleError(f"unexpected character {text[pos]!r} at column {pos + 1}")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append(_Tok(kind, m.group(), pos))
            if len(out) > MAX_TOKENS:
                raise RuleError(f"rule longer than {MAX_TOKENS} tokens")
        pos = m.end()
    return out


# -- the syntax tree ----------------------------------------------------------------------------

Expr = tuple[Any, ...]
"""``("lit", value)``, ``("field", name)``, ``("not", e)``, ``("and", e, e)``,
``("or", e, e)``, ``("cmp", op, e, e)``."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """``daily at HH:MM`` in a fixed offset from UTC (minutes, e.g. +120 for +02:00)."""

    hour: int
    minute: int
    offset_minutes: int = 0


@dataclass(frozen=True, slots=True)
class Action:
    """One action of a rule.

    Attributes:
        kind: ``notify_owner``, ``show_card``, ``append`` or ``forward``.
        target: the log name (append) or the second party's hashname (forward), else "".
        value: the text (notify_owner) or the value expression (append), else None.
    """

    kind: str
    target: str = ""
    value: Expr | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A parsed rule.

    Attributes:
        id: the rule's document id in the ``rules`` collection ("" before it is stored).
        text: the source text. event: the event it reacts to.
        schedule: for ``schedule`` rules, when. condition: the ``if`` part or None.
        actions: what to do. created_ms: the rule applies to events from this time on.
    """

    id: str
    text: str
    event: str
    schedule: Schedule | None
    condition: Expr | None
    actions: tuple[Action, ...]
    created_ms: int = 0


class _Parser:
    def __init__(self, toks: list[_Tok], event_fields: frozenset[str]) -> None:
        self.toks = toks
        self.i = 0
        self.fields = event_fields
        self.depth = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str | None = None, text: str | None = None) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise RuleError(f"the rule ends early: expected {text or kind}")
        if (kind is not None and tok.kind != kind) or (text is not None and tok.text != text):
            raise RuleError(f"expected {text or kind} at column {tok.pos + 1}, "
                            f"found {tok.text!r}")
        self.i += 1
        return tok

    def at(self, text: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.text == text and tok.kind in ("name", "punct", "op")

    def deeper(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise RuleError(f"condition nested deeper than {MAX_DEPTH}")

    def expr(self) -> Expr:
        left = self.conj()
        while self.at("or"):
            self.i += 1
            left = ("or", left, self.conj())
        return left

    def conj(self) -> Expr:
        left = self.neg()
        while self.at("and"):
            self.i += 1
            left = ("and", left, self.neg())
        return left

    def neg(self) -> Expr:
        if self.at("not"):
            self.i += 1
            self.deeper()
            inner = self.neg()
            self.depth -= 1
            return ("not", inner)
        return self.cmp()

    def cmp(self) -> Expr:
        left = self.operand()
        tok = self.peek()
        if tok is not None and tok.kind == "op":
            self.i += 1
            return ("cmp", tok.text, left, self.operand())
        return left

    def operand(self) -> Expr:
        tok = self.take()
        if tok.kind == "punct" and tok.text == "(":
            self.deeper()
            inner = self.expr()
            self.take("punct", ")")
            self.depth -= 1
            return inner
        return self.literal_or_field(tok)

    def literal_or_field(self, tok: _Tok) -> Expr:
        if tok.kind == "number":
            return ("lit", float(tok.text) if "." in tok.text else int(tok.text))
        if tok.kind == "string":
            return ("lit", _unquote(tok.text))
        if tok.kind == "name":
            if tok.text in ("true", "false"):
                return ("lit", tok.text == "true")
            if tok.text in ("and", "or", "not", "do", "if", "on"):
                raise RuleError(f"unexpected {tok.text!r} at column {tok.pos + 1}")
            if tok.text not in self.fields:
                raise RuleError(f"unknown name {tok.text!r} at column {tok.pos + 1}; this "
                                f"event has {sorted(self.fields)}")
            return ("field", tok.text)
        raise RuleError(f"unexpected {tok.text!r} at column {tok.pos + 1}")

    def action(self) -> Action:
        tok = self.take("name")
        kind = tok.text
        if kind not in ACTIONS:
            raise RuleError(f"unknown action {kind!r}; use one of {sorted(ACTIONS)}")
        if kind == "show_card":
            return Action(kind)
        if kind == "notify_owner":
            if not self.at("("):
                return Action(kind)
            self.take("punct", "(")
            text = self.take("string")
            self.take("punct", ")")
            return Action(kind, value=("lit", _unquote(text.text)))
        self.take("punct", "(")
        if kind == "forward":
            target = self.take()
            name = _unquote(target.text) if target.kind == "string" else target.text
            if not is_hashname(name):
                raise RuleError("forward needs the second party's 52-character hashname")
            self.take("punct", ")")
            return Action(kind, target=name)
        log = self.take("name").text
        if log in _t.RESERVED or log == _t.EVENTS or log in _t.COLLECTIONS:
            raise RuleError(f"rules may not append to {log!r}; name a log of your own "
                            "(e.g. alerts) or 'readings'")
        self.take("punct", ",")
        value = self.literal_or_field(self.take())
        self.take("punct", ")")
        return Action(kind, target=log, value=value)


def _unquote(text: str) -> str:
    body = text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if len(body) > MAX_STRING:
        raise RuleError(f"string longer than {MAX_STRING} characters")
    return body


_TIME = re.compile(r"(\d{2}):(\d{2})\Z")


def _hhmm(text: str, what: str, max_hour: int) -> tuple[int, int]:
    m = _TIME.match(text.lstrip("+-"))
    if m is None or int(m.group(1)) > max_hour or int(m.group(2)) > 59:
        raise RuleError(f"bad {what} {text!r}: use HH:MM")
    return int(m.group(1)), int(m.group(2))


def parse_rule(text: str, *, rule_id: str = "", created_ms: int = 0) -> Rule:
    """Parse one rule (grammar in docs/things.md "rules").

    Args:
        text: ``on EVENT [daily at HH:MM [+HH:MM]] [if CONDITION] do ACTION[, ACTION...]``.
        rule_id: its id once stored. created_ms: when it was stored.

    Returns:
        The :class:`Rule`.

    Raises:
        RuleError: bad syntax, an unknown event, name or action, a schedule on a
            non-schedule event (or none on one), or a broken size or depth limit.
    """
    if not isinstance(text, str):
        raise RuleError("a rule is text")
    if len(text) > MAX_RULE_TEXT:
        raise RuleError(f"rule longer than {MAX_RULE_TEXT} characters")
    p = _Parser(_tokenize(text), frozenset())
    p.take("name", "on")
    event = p.take("name").text
    if event not in EVENTS:
        raise RuleError(f"unknown event {event!r}; use one of {sorted(EVENTS)}")
    p.fields = EVENT_FIELDS[event]
    schedule = None
    if event == "schedule":
        p.take("name", "daily")
        p.take("name", "at")
        hour, minute = _hhmm(p.take("time").text, "time", 23)
        offset = 0
        tok = p.peek()
        if tok is not None and tok.kind == "offset":
            p.i += 1
            oh, om = _hhmm(tok.text, "offset", 14)
            offset = (oh * 60 + om) * (-1 if tok.text.startswith("-") else 1)
        elif tok is not None and tok.text == "utc":
            p.i += 1
        schedule = Schedule(hour, minute, offset)
    condition = None
    if p.at("if"):
        p.i += 1
        condition = p.expr()
    p.take("name", "do")
    actions = [p.action()]
    while p.at(","):
        p.i += 1
        actions.append(p.action())
        if len(actions) > MAX_ACTIONS:
            raise RuleError(f"a rule has at most {MAX_ACTIONS} actions")
    extra = p.peek()
    if extra is not None:
        raise RuleError(f"unexpected {extra.text!r} at column {extra.pos + 1}")
    return Rule(rule_id, text, event, schedule, condition, tuple(actions), created_ms)


# -- evaluation ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a thing.

    Attributes:
        id: unique id (the ``done`` key). type: one of EVENTS.
        origin: the device where it happened ("" for schedules).
        at_ms: when. fields: what conditions read.
    """

    id: str
    type: str
    origin: str
    at_ms: int
    fields: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Any) -> Event | None:
        """An event from an ``events`` log record, or None if the record is not one.

        Args:
            record: a log value (p2pcloud.things.thing.event_record).

        Returns:
            The event, or None for records of other types or shapes.
        """
        if not isinstance(record, dict):
            return None
        eid, kind, at = record.get("id"), record.get("type"), record.get("at_ms")
        if (not isinstance(eid, str) or kind not in EVENTS or not isinstance(at, int)
                or isinstance(at, bool)):
            return None
        origin = record.get("by", "")
        fields = {k: v for k, v in record.items() if k in EVENT_FIELDS[kind]}
        return cls(eid, kind, origin if isinstance(origin, str) else "", at, fields)


@dataclass(frozen=True, slots=True)
class Firing:
    """A rule that fired for an event, with its actions resolved to values.

    Attributes:
        rule_id: the rule. event_id: the event.
        actions: ``(kind, target, value)`` triples: notify_owner (``"", text``), show_card,
            append (``log, value``), forward (``hashname, None``).
    """

    rule_id: str
    event_id: str
    actions: tuple[tuple[str, str, Any], ...]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value(e: Expr, fields: Mapping[str, Any], depth: int = 0) -> Any:
    if depth > 2 * MAX_DEPTH + 8:  # the parser bounds depth; this guards hand-built trees
        raise RuleError("expression too deep")
    tag = e[0]
    if tag == "lit":
        return e[1]
    if tag == "field":
        return fields.get(e[1])
    if tag == "not":
        return _value(e[1], fields, depth + 1) is not True
    if tag == "and":
        return (_value(e[1], fields, depth + 1) is True
                and _value(e[2], fields, depth + 1) is True)
    if tag == "or":
        return (_value(e[1], fields, depth + 1) is True
                or _value(e[2], fields, depth + 1) is True)
    op, a, b = e[1], _value(e[2], fields, depth + 1), _value(e[3], fields, depth + 1)
    if op in ("==", "!="):
        same = (a == b) if (_number(a) and _number(b)) or type(a) is type(b) else False
        return same if op == "==" else not same
    if not ((_number(a) and _number(b)) or (isinstance(a, str) and isinstance(b, str))):
        return False  # ordering across types is false, never an error
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


def evaluate(rules: Iterable[Rule], event: Event) -> list[Firing]:
    """The rules that fire for an event, in rule-id order (pure and deterministic).

    A rule fires when its event type matches, the event is not older than the rule, a
    schedule event names this rule, and its condition (if any) is true. Missing fields read
    as "absent": comparisons with them are false.

    Args:
        rules: the thing's rules. event: the event.

    Returns:
        The firings.
    """
    out = []
    for rule in sorted(rules, key=lambda r: r.id):
        if rule.event != event.type or event.at_ms < rule.created_ms:
            continue
        if rule.event == "schedule" and event.fields.get("rule") != rule.id:
            continue
        if rule.condition is not None and _value(rule.condition, event.fields) is not True:
            continue
        acts = []
        for a in rule.actions:
            value = _value(a.value, event.fields) if a.value is not None else None
            acts.append((a.kind, a.target, value))
        out.append(Firing(rule.id, event.id, tuple(acts)))
    return out


def _occurrence(day: int, s: Schedule) -> int:
    """UTC ms of the local ``day`` (days since the epoch, local calendar) at s.hour:s.minute."""
    return day * _DAY_MS + (s.hour * 60 + s.minute - s.offset_minutes) * 60_000


def schedule_events(rules: Iterable[Rule], *, since_ms: int, now_ms: int) -> list[Event]:
    """Occurrences of schedule rules in ``(since_ms, now_ms]`` (at most the last week's).

    The id ``schedule:<rule id>:<local date>`` is the same on every device, so done-markers
    written by one device stop the others.

    Args:
        rules: the thing's rules. since_ms: the last time this was asked (exclusive).
        now_ms: now (inclusive).

    Returns:
        The events, oldest first.
    """
    import datetime as _dt

    start = max(since_ms, now_ms - MAX_CATCHUP_DAYS * _DAY_MS)
    out = []
    for rule in rules:
        s = rule.schedule
        if rule.event != "schedule" or s is None:
            continue
        first_day = (start + s.offset_minutes * 60_000) // _DAY_MS - 1
        last_day = (now_ms + s.offset_minutes * 60_000) // _DAY_MS + 1
        for day in range(first_day, last_day + 1):
            at = _occurrence(day, s)
            if not (start < at <= now_ms) or at < rule.created_ms:
                continue
            date = _dt.date(1970, 1, 1) + _dt.timedelta(days=day)
            out.append(Event(f"schedule:{rule.id}:{date.isoformat()}", "schedule", "", at,
                             {"rule": rule.id, "date": date.isoformat(),
                              "weekday": date.weekday(),
                              "time": f"{s.hour:02d}:{s.minute:02d}"}))
    return sorted(out, key=lambda e: (e.at_ms, e.id))


# -- storage in the sub-cloud ---------------------------------------------------------------------


def add_rule(replica: Replica, text: str, *, entropy: Entropy,
             now_ms: int) -> tuple[Rule, bytes]:
    """Check and store a rule in the thing's sub-cloud.

    Args:
        replica: our replica. text: the rule. entropy: randomness for its id.
        now_ms: wall-clock milliseconds (the rule applies to events from then on).

    Returns:
        ``(rule, delta)``.

    Raises:
        RuleError: the rule does not parse, or the thing has MAX_RULES rules already.
    """
    if len(replica.documents(_t.RULES)) >= MAX_RULES:
        raise RuleError(f"a thing has at most {MAX_RULES} rules")
    rule_id = b32encode(_t._entropy(entropy, 10))
    rule = parse_rule(text, rule_id=rule_id, created_ms=now_ms)
    replica.begin(now_ms)
    replica.set_many(_t.RULES, rule_id, {"text": text, "created_ms": now_ms, "enabled": True})
    return rule, bytes(replica.commit())


def remove_rule(replica: Replica, rule_id: str, *, now_ms: int) -> bytes:
    """Delete a rule.

    Args:
        replica: our replica. rule_id: the rule. now_ms: wall-clock milliseconds.

    Returns:
        The delta (``b""`` if there was no such rule).
    """
    replica.begin(now_ms)
    replica.remove(_t.RULES, rule_id)
    return bytes(replica.commit())


def load_rules(replica: Replica, cache: dict[tuple[str, str, int], Rule] | None = None
               ) -> tuple[list[Rule], dict[str, str]]:
    """Read and parse the stored rules.

    A rule that does not parse (written by a newer version, say) is skipped and reported,
    never half-run.

    Args:
        replica: a replica of the thing's sub-cloud.
        cache: parsed rules by (id, text, created), reused across calls (the runner keeps
            one, so an unchanged rule is parsed once).

    Returns:
        ``(rules, {rule id: error text})``.
    """
    rules, errors = [], {}
    if cache is not None and len(cache) > 4 * MAX_RULES:
        cache.clear()  # edited rules leave stale entries; bound them
    for rule_id in replica.documents(_t.RULES)[:MAX_RULES]:
        doc = replica.document(_t.RULES, rule_id) or {}
        if doc.get("enabled") is False:
            continue
        created, text = doc.get("created_ms", 0), doc.get("text")
        try:
            if not isinstance(text, str):
                raise RuleError("the stored rule has no text")
            created = created if isinstance(created, int) else 0
            key = (rule_id, text, created)
            parsed = cache.get(key) if cache is not None else None
            if parsed is None:
                parsed = parse_rule(text, rule_id=rule_id, created_ms=created)
                if cache is not None:
                    cache[key] = parsed
            rules.append(parsed)
        except RuleError as exc:
            errors[rule_id] = str(exc)
    return rules, errors


# -- exactly once -----------------------------------------------------------------------------


def candidates(event: Event, hosts: Sequence[str]) -> list[str]:
    """The devices that may handle an event, in the order they take over.

    Args:
        event: the event. hosts: the hashnames the cloud lists as rule hosts.

    Returns:
        The origin device first (if any), then the hosts ranked by
        ``SHA-256(event id | host)`` (rendezvous hashing: every device computes the same
        order, and load spreads over the hosts).
    """
    ranked = sorted(set(hosts) - {event.origin}, key=lambda h: (
        hashlib.sha256(f"{event.id}|{h}".encode()).digest(), h))
    return ([event.origin] if event.origin else []) + ranked


def rule_hosts(membership: Membership, subcloud: SubCloudId) -> list[Hashname]:
    """The default rule hosts of a thing: every member device that holds its key.

    The cloud may list fewer (say, only the always-on home box); any list works as long as
    every device uses the same one.

    Args:
        membership: the cloud's membership. subcloud: the thing's sub-cloud.

    Returns:
        The hashnames, sorted.
    """
    return sorted(_t.sealing_members(membership, subcloud))


def _done_key(rule_id: str, event_id: str) -> str:
    return f"{rule_id}|{event_id}"


def is_done(replica: Replica, rule_id: str, event_id: str) -> bool:
    """Whether some device already handled this rule for this event (a merged done-marker).

    Args:
        replica: a replica of the thing's sub-cloud. rule_id, event_id: the firing.

    Returns:
        True when the marker is present.
    """
    return replica.document(_t.DONE, _done_key(rule_id, event_id)) is not None


def done_by(replica: Replica, rule_id: str, event_id: str) -> tuple[str, ...]:
    """Which devices marked a firing done (more than one shows a partition duplicate).

    Args:
        replica: a replica. rule_id, event_id: the firing.

    Returns:
        The hashnames, oldest first.
    """
    value = replica.get(_t.DONE, _done_key(rule_id, event_id), "by", ())
    return tuple(value) if isinstance(value, tuple) else ()


HandlerFn = Callable[[Event], Any]


class HandlerRegistry:
    """Python handlers for thing events, for developers embedding the library.

    ``registry.on("reading_added")(handler)`` (or as a decorator) registers a handler; the
    shell calls the handlers of an event on the device the exactly-once plan assigns, under
    the rule id ``HANDLERS_RULE``.
    """

    HANDLERS_RULE: Final = "py-handlers"

    def __init__(self) -> None:
        """Start with no handlers."""
        self._handlers: dict[str, list[HandlerFn]] = {}

    def on(self, event: str) -> Callable[[HandlerFn], HandlerFn]:
        """Register a handler for an event type.

        Args:
            event: one of EVENTS.

        Returns:
            A decorator that registers the function and returns it unchanged.

        Raises:
            RuleError: an unknown event type.
        """
        if event not in EVENTS:
            raise RuleError(f"unknown event {event!r}; use one of {sorted(EVENTS)}")

        def register(fn: HandlerFn) -> HandlerFn:
            self._handlers.setdefault(event, []).append(fn)
            return fn

        return register

    def handlers_for(self, event: str) -> list[HandlerFn]:
        """The handlers registered for an event type, in registration order."""
        return list(self._handlers.get(event, ()))

    def firing(self, event: Event) -> Firing | None:
        """A pseudo-firing for the handlers of ``event`` (None if it has none)."""
        if not self._handlers.get(event.type):
            return None
        return Firing(self.HANDLERS_RULE, event.id, ())

    def invoke(self, event: Event) -> list[Any]:
        """Call the handlers of an event (the shell calls this for a due handler firing).

        Args:
            event: the event.

        Returns:
            What each handler returned.
        """
        return [fn(event) for fn in self.handlers_for(event.type)]


@dataclass(frozen=True, slots=True)
class Due:
    """A firing this device must handle now: run the external actions after complete()."""

    event: Event
    firing: Firing


class RuleRunner:
    """Exactly-once rule handling for one thing on one device (a pure state machine).

    The shell calls :meth:`observe` after local writes and merges, :meth:`due` to learn what
    to run, :meth:`complete` for each due firing (it writes the appends and the done-marker
    in one transaction and returns the external actions), and sleeps until
    :meth:`get_timer`.
    """

    def __init__(self, me: str, hosts: Sequence[str], *,
                 registry: HandlerRegistry | None = None, started_ms: int,
                 schedules_since_ms: int | None = None,
                 takeover_ms: int = TAKEOVER_MS) -> None:
        """Create the runner (once per thing when the device starts).

        Args:
            me: this device's hashname. hosts: the cloud's rule hosts.
            registry: Python handlers, if any.
            started_ms: when this device started. Firings of events older than that wait
                ``SETTLE_MS`` more, so the first sync can bring in done-markers other devices
                wrote while this one was down.
            schedules_since_ms: schedule occurrences after this time are considered (the
                last time the device ran, if the shell remembers it; default started_ms).
            takeover_ms: how long each candidate waits for the one before it, and how long
                overdue work waits after a start (``TAKEOVER_MS`` / ``SETTLE_MS``); every
                device of a cloud must use the same value.
        """
        self.me = me
        self.hosts = list(hosts)
        self.registry = registry
        self.started_ms = started_ms
        self._pending: dict[tuple[str, str], Due] = {}
        self._seen: set[str] = set()
        self._schedule_since = started_ms if schedules_since_ms is None else schedules_since_ms
        self._wake: int | None = None
        self._rule_cache: dict[tuple[str, str, int], Rule] = {}
        self.takeover_ms = takeover_ms

    def observe(self, replica: Replica, now_ms: int) -> None:
        """Take in new events from the ``events`` log and schedule occurrences up to now.

        Args:
            replica: this device's replica of the thing's sub-cloud. now_ms: now.
        """
        rules, _errors = load_rules(replica, self._rule_cache)
        events = []
        for _h, _r, record in replica.log(_t.EVENTS):
            event = Event.from_record(record)
            if event is not None and event.id not in self._seen:
                self._seen.add(event.id)
                events.append(event)
        if now_ms > self._schedule_since:
            events.extend(schedule_events(rules, since_ms=self._schedule_since, now_ms=now_ms))
            self._schedule_since = now_ms
        for event in events:
            if self.me not in candidates(event, self.hosts):
                continue
            firings = evaluate(rules, event)
            extra = self.registry.firing(event) if self.registry is not None else None
            for f in firings + ([extra] if extra is not None else []):
                self._pending[(f.rule_id, f.event_id)] = Due(event, f)

    def resume(self, now_ms: int) -> None:
        """Call when the device wakes from sleep or its links come back after a cut: work that
        became due meanwhile waits ``SETTLE_MS`` for the first sync, as after a start.

        Args:
            now_ms: now.
        """
        self.started_ms = now_ms

    def _start(self, event: Event) -> int:
        rank = candidates(event, self.hosts).index(self.me)
        start = event.at_ms + rank * self.takeover_ms
        if event.at_ms < self.started_ms:
            # Overdue work found at start-up: let the first sync deliver markers first.
            start = max(start, self.started_ms + self.takeover_ms)
        return start

    def due(self, replica: Replica, now_ms: int) -> list[Due]:
        """The firings this device must handle now (done-markers merged so far are skipped).

        Args:
            replica: this device's replica. now_ms: now.

        Returns:
            The due firings, oldest event first; call :meth:`complete` for each.
        """
        out, wake = [], None
        for key, d in sorted(self._pending.items(), key=lambda kv: (kv[1].event.at_ms, kv[0])):
            if is_done(replica, *key):
                del self._pending[key]
                continue
            start = self._start(d.event)
            if now_ms >= start:
                out.append(d)
            else:
                wake = start if wake is None else min(wake, start)
        self._wake = wake
        return out

    def get_timer(self) -> int | None:
        """When the next pending firing becomes this device's to handle (ms), or None."""
        return self._wake

    def complete(self, replica: Replica, due: Due, *, now_ms: int,
                 notify_log: str | None = None) -> tuple[list[tuple[str, str, Any]], bytes]:
        """Handle one due firing: appends and the done-marker in one transaction.

        Args:
            replica: this device's replica. due: from :meth:`due`. now_ms: now.
            notify_log: if given, ``notify_owner`` and ``show_card`` actions are also written
                as records ``{text, rule, event, type, at_ms}`` (``card`` for show_card) to
                this log in the same transaction, so every owner device learns of them
                through sync, exactly once and durably with the marker.

        Returns:
            ``(external actions to run now: notify_owner/show_card/forward, delta)``; an
            empty delta when another device's marker arrived meanwhile (nothing to do).
        """
        key = (due.firing.rule_id, due.firing.event_id)
        self._pending.pop(key, None)
        if is_done(replica, *key):
            return [], b""
        replica.begin(now_ms)
        for kind, target, value in due.firing.actions:
            if kind == "append":
                replica.append(target, {"value": value, "rule": due.firing.rule_id,
                                        "event": due.event.id, "at_ms": due.event.at_ms})
            elif notify_log is not None and kind in ("notify_owner", "show_card"):
                record: dict[str, Any] = {
                    "text": str(value) if kind == "notify_owner" and value is not None
                    else ("card shown" if kind == "show_card" else ""),
                    "rule": due.firing.rule_id, "event": due.event.id,
                    "type": due.event.type, "at_ms": due.event.at_ms}
                if kind == "show_card":
                    record["card"] = _t.card(replica)
                replica.append(notify_log, record)
        replica.set_mv(_t.DONE, _done_key(*key), "by", self.me)
        replica.set(_t.DONE, _done_key(*key), "at_ms", now_ms)
        delta = bytes(replica.commit())
        return [a for a in due.firing.actions if a[0] in EXTERNAL_ACTIONS], delta
