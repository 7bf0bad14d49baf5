"""Rules: the parser and its refusals, the evaluator, schedules, exactly-once handling."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from p2pcloud._core import Replica
from p2pcloud._crypto import LocalIdentity
from p2pcloud.errors import RuleError
from p2pcloud.things import rules as r
from p2pcloud.things import scan as s
from p2pcloud.things import thing as t
from tests.things.helpers import SeededEntropy, make_cloud, make_thing, replica_for

HN = LocalIdentity.generate(SeededEntropy("vendor")).hashname
# 2026-06-01 05:25 UTC: five minutes before a "daily at 07:30 +02:00" occurrence.
START = int(dt.datetime(2026, 6, 1, 5, 25, tzinfo=dt.UTC).timestamp() * 1000)
MINUTE = 60_000


# -- parser ----------------------------------------------------------------------------------


def test_parse_examples() -> None:
    rule = r.parse_rule('on reading_added if value > 80 and unit == "kg" do '
                        'notify_owner("heavy"), append(alerts, value)')
    assert rule.event == "reading_added" and rule.schedule is None
    assert rule.condition == ("and", ("cmp", ">", ("field", "value"), ("lit", 80)),
                              ("cmp", "==", ("field", "unit"), ("lit", "kg")))
    assert rule.actions == (r.Action("notify_owner", value=("lit", "heavy")),
                            r.Action("append", "alerts", ("field", "value")))
    sched = r.parse_rule("on schedule daily at 07:30 +02:00 do show_card")
    assert sched.schedule == r.Schedule(7, 30, 120)
    assert r.parse_rule("on schedule daily at 23:59 -05:30 do notify_owner").schedule == \
        r.Schedule(23, 59, -330)
    assert r.parse_rule("on schedule daily at 00:00 utc do notify_owner").schedule == \
        r.Schedule(0, 0, 0)
    fwd = r.parse_rule(f"on message_received do forward({HN})")
    assert fwd.actions == (r.Action("forward", HN),)
    assert r.parse_rule(f'on message_received do forward("{HN}")').actions == fwd.actions
    neg = r.parse_rule('on scanned if not owner or (finder != "" and not (owner)) do show_card')
    assert neg.condition is not None and neg.condition[0] == "or"
    assert r.parse_rule("on reading_added if value >= -1.5 do notify_owner").condition == \
        ("cmp", ">=", ("field", "value"), ("lit", -1.5))
    assert r.parse_rule('on message_received if text == "say \\"hi\\"" do show_card'
                        ).condition == ("cmp", "==", ("field", "text"), ("lit", 'say "hi"'))


@pytest.mark.parametrize(("text", "message"), [
    ("on scanned if " + "(" * 13 + "owner" + ")" * 13 + " do show_card", "deeper"),
    ("on scanned if " + "not " * 13 + "owner do show_card", "deeper"),
    ("on scanned if value > 3 do show_card", "unknown name 'value'"),
    ("on reading_added if weight > 3 do show_card", "unknown name 'weight'"),
    ("on exploded do show_card", "unknown event"),
    ("on scanned do launch_rockets", "unknown action"),
    ("on scanned show_card", "expected do"),
    ("on scanned if owner == do show_card", "unexpected 'do'"),
    ("on scanned if (owner do show_card", "expected )"),
    ('on scanned if finder == "open do show_card', "unexpected character"),
    ("on scanned do show_card; notify_owner", "unexpected character ';'"),
    ('on scanned if __import__("os") do show_card', "unknown name"),
    ("on scanned if owner.__class__ do show_card", "unexpected character '.'"),
    ("on scanned do show_card show_card", "unexpected 'show_card'"),
    ("on scanned", "ends early"),
    ("on schedule do notify_owner", "expected daily"),
    ("on schedule daily at 25:00 do notify_owner", "bad time"),
    ("on schedule daily at 07:30 +15:00 do notify_owner", "bad offset"),
    ("on scanned daily at 07:30 do notify_owner", "expected do"),
    ("on scanned do append(inbox, 1)", "may not append"),
    ("on scanned do append(events, 1)", "may not append"),
    ("on scanned do append(keys, 1)", "may not append"),
    ("on scanned do forward(not_a_hashname)", "hashname"),
    ('on scanned do notify_owner("' + "x" * 300 + '")', "string longer"),
    ("on scanned do " + ", ".join(["show_card"] * 5), "at most 4 actions"),
    ("on scanned if " + " or ".join(["1"] * 101) + " do show_card", "tokens"),
    ("on scanned do show_card" + " " * 1100, "longer than 1024"),
])
def test_parser_refusals(text: str, message: str) -> None:
    with pytest.raises(RuleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        r.parse_rule(text)


def test_parser_never_raises_anything_else() -> None:
    rng = random.Random(5)
    words = ["on", "scanned", "schedule", "daily", "at", "07:30", "+02:00", "if", "not", "and",
             "or", "(", ")", "owner", "value", "==", "<", "3", '"x"', "do", "show_card",
             "append", ",", "alerts", "forward", HN, "notify_owner", "reading_added", "é",
             "\x00", "--", "1e9", "99999999999999999999"]
    parsed = refused = 0
    for i in range(3000):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        if i % 3 == 0:  # start most like a rule, so the parser gets past the head
            text = "on scanned if " + text + " do show_card"
        try:
            rule = r.parse_rule(text)
        except RuleError:
            refused += 1
            continue
        parsed += 1
        assert r.parse_rule(rule.text) == rule
    assert parsed > 0 and refused > 0


# -- evaluator ---------------------------------------------------------------------------------


def ev(event_type: str, eid: str = "e1", at: int = START, origin: str = "",
       **fields: Any) -> r.Event:
    return r.Event(eid, event_type, origin, at, fields)


def rule(text: str, rid: str = "r1", created: int = 0) -> r.Rule:
    return r.parse_rule(text, rule_id=rid, created_ms=created)


@pytest.mark.parametrize(("cond", "fields", "fires"), [
    ("value > 80", {"value": 81}, True),
    ("value > 80", {"value": 80}, False),
    ("value > 80", {"value": 80.5}, True),
    ("value > 80", {"value": "81"}, False),  # a string is never ordered against a number
    ("value > 80", {}, False),  # a missing field compares false
    ('unit == "kg"', {"unit": "kg"}, True),
    ('unit != "kg"', {"unit": "lb"}, True),
    ('unit != "kg"', {}, True),
    ('unit < "m"', {"unit": "kg"}, True),
    ("value == 1", {"value": True}, False),  # booleans are not numbers
    ("value == 1", {"value": 1.0}, True),
    ('value > 1 and unit == "kg" or kind == "x"', {"value": 0, "kind": "x"}, True),
    ('value > 1 and (unit == "kg" or kind == "x")', {"value": 0, "kind": "x"}, False),
    ("not value > 1", {"value": 0}, True),
    ("not not value > 1", {"value": 5}, True),
    ("value", {"value": 5}, False),  # only a true boolean is true
])
def test_conditions(cond: str, fields: dict[str, Any], fires: bool) -> None:
    rules = [rule(f"on reading_added if {cond} do notify_owner")]
    assert bool(r.evaluate(rules, ev("reading_added", **fields))) == fires


def test_evaluate_is_deterministic_and_resolves_actions() -> None:
    rules = [rule('on reading_added if value > 80 do notify_owner("heavy"), append(alerts, '
                  'value)', "b"),
             rule("on reading_added do append(readings_copy, unit)", "a"),
             rule("on scanned do show_card", "c"),
             rule(f"on reading_added if value > 1000 do forward({HN})", "d")]
    event = ev("reading_added", value=85, unit="kg")
    first = r.evaluate(rules, event)
    assert [f.rule_id for f in first] == ["a", "b"]
    assert first[1].actions == (("notify_owner", "", "heavy"), ("append", "alerts", 85))
    assert first[0].actions == (("append", "readings_copy", "kg"),)
    for seed in range(5):
        shuffled = rules[:]
        random.Random(seed).shuffle(shuffled)
        assert r.evaluate(shuffled, event) == first


def test_rules_do_not_fire_for_events_older_than_the_rule() -> None:
    rules = [rule("on scanned do show_card", created=START)]
    assert r.evaluate(rules, ev("scanned", at=START - 1)) == []
    assert len(r.evaluate(rules, ev("scanned", at=START))) == 1


def test_event_from_record() -> None:
    rec = t.event_record("reading_added", by=None, now_ms=START, entropy=SeededEntropy("x"),
                         value=3, unit="kg", kind="w", secret="not a field")
    event = r.Event.from_record(rec)
    assert event is not None and event.fields == {"value": 3, "unit": "kg", "kind": "w",
                                                  "by": ""}
    for bad in (None, [], {"id": 1}, {"id": "x", "type": "claimed", "at_ms": 1},
                {"id": "x", "type": "scanned", "at_ms": True}):
        assert r.Event.from_record(bad) is None


# -- schedules ---------------------------------------------------------------------------------


def test_schedule_occurrences_in_a_time_zone() -> None:
    rules = [rule("on schedule daily at 07:30 +02:00 do notify_owner", "s1"),
             rule("on scanned do show_card", "x")]
    events = r.schedule_events(rules, since_ms=START, now_ms=START + 3 * 86_400_000)
    assert [e.id for e in events] == ["schedule:s1:2026-06-01", "schedule:s1:2026-06-02",
                                      "schedule:s1:2026-06-03"]
    assert events[0].at_ms == START + 5 * MINUTE  # 05:30 UTC is 07:30 at +02:00
    assert events[0].fields == {"rule": "s1", "date": "2026-06-01", "weekday": 0,
                                "time": "07:30"}
    # Same occurrences whoever computes them, however the interval is cut.
    pieces = (r.schedule_events(rules, since_ms=START, now_ms=START + 86_400_000)
              + r.schedule_events(rules, since_ms=START + 86_400_000,
                                  now_ms=START + 3 * 86_400_000))
    assert pieces == events
    assert len(r.evaluate(rules, events[0])) == 1
    other = rule("on schedule daily at 07:30 +02:00 do notify_owner", "s2")
    assert r.evaluate([other], events[0]) == []  # an occurrence fires only its own rule


def test_schedule_local_date_across_midnight() -> None:
    late = rule("on schedule daily at 23:30 -05:00 do notify_owner", "s")
    events = r.schedule_events([late], since_ms=START, now_ms=START + 86_400_000)
    assert [e.fields["date"] for e in events] == ["2026-06-01"]
    assert events[0].at_ms == int(dt.datetime(2026, 6, 2, 4, 30, tzinfo=dt.UTC).timestamp()
                                  * 1000)


def test_schedule_catch_up_is_bounded() -> None:
    rules = [rule("on schedule daily at 07:30 utc do notify_owner", "s")]
    events = r.schedule_events(rules, since_ms=0, now_ms=START + 40 * 86_400_000)
    assert len(events) == r.MAX_CATCHUP_DAYS


# -- storage --------------------------------------------------------------------------------------


def test_rules_are_stored_in_the_sub_cloud() -> None:
    cloud = make_cloud("home")
    _new, replica, _ = make_thing(cloud)
    stored, _delta = r.add_rule(replica, "on scanned do show_card",
                                entropy=SeededEntropy("r"), now_ms=START)
    with pytest.raises(RuleError):
        r.add_rule(replica, "on scanned do nothing", entropy=SeededEntropy("r"), now_ms=START)
    replica.begin(START)
    replica.set_many(t.RULES, "future", {"text": "on teleported do beam", "created_ms": 1})
    replica.commit()
    rules, errors = r.load_rules(replica)
    assert rules == [stored] and set(errors) == {"future"}
    cache: dict[tuple[str, str, int], r.Rule] = {}
    first = r.load_rules(replica, cache)[0][0]
    assert r.load_rules(replica, cache)[0][0] is first  # parsed once
    replica.begin(START + 1)
    replica.set(t.RULES, stored.id, "text", "on scanned do notify_owner")
    replica.commit()
    assert r.load_rules(replica, cache)[0][0].text == "on scanned do notify_owner"
    r.remove_rule(replica, stored.id, now_ms=START + 1)
    assert r.load_rules(replica)[0] == []


# -- exactly once ------------------------------------------------------------------------------


@dataclass
class Device:
    name: str
    identity: LocalIdentity
    replica: Replica
    runner: r.RuleRunner
    online: bool = True


@dataclass
class Sim:
    devices: list[Device]
    now: int = START
    executed: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    external: list[tuple[str, tuple[str, str, Any]]] = field(default_factory=list)
    handled_py: list[tuple[str, str]] = field(default_factory=list)

    def sync(self) -> None:
        """Anti-entropy among the online devices: each sends what the other lacks."""
        online = [d for d in self.devices if d.online]
        for a in online:
            for b in online:
                if a is not b:
                    b.replica.apply([a.replica.encode_since(b.replica.version())], self.now)

    def run(self, registry: r.HandlerRegistry | None = None) -> None:
        for d in self.devices:
            if not d.online:
                continue
            d.runner.observe(d.replica, self.now)
            for due in d.runner.due(d.replica, self.now):
                actions, delta = d.runner.complete(d.replica, due, now_ms=self.now)
                if not delta:
                    continue
                key = (due.firing.rule_id, due.firing.event_id)
                self.executed.setdefault(key, []).append(d.name)
                self.external.extend((d.name, a) for a in actions)
                if registry is not None and key[0] == registry.HANDLERS_RULE:
                    registry.invoke(due.event)

    def advance(self, ms: int, *, step: int = 5_000, sync: bool = True,
                registry: r.HandlerRegistry | None = None) -> None:
        end = self.now + ms
        while self.now < end:
            self.now += step
            self.run(registry)
            if sync:
                self.sync()


RULES = ['on reading_added if value > 80 do notify_owner("heavy"), append(alerts, value)',
         "on scanned do notify_owner",
         'on schedule daily at 07:30 +02:00 do notify_owner("water the plant")']


def make_sim(n: int, registry: r.HandlerRegistry | None = None) -> Sim:
    cloud = make_cloud("sim", n)
    new, first, layout = make_thing(cloud)
    deltas = [layout]
    for i, text in enumerate(RULES):
        _rule, delta = r.add_rule(first, text, entropy=SeededEntropy(f"rule{i}"),
                                  now_ms=START - MINUTE)
        deltas.append(delta)
    hosts = [d.hashname for d in cloud.devices]
    devices = []
    for i, ident in enumerate(cloud.devices):
        replica = first if i == 0 else replica_for(new.subcloud, ident)
        if i:
            replica.apply(deltas, START)
        devices.append(Device("ABC"[i], ident, replica,
                              r.RuleRunner(ident.hashname, hosts, registry=registry,
                                           started_ms=START)))
    return Sim(devices)


def reading(sim: Sim, device: Device, value: float) -> str:
    event, _ = t.add_reading(device.replica, value, unit="kg", by=device.identity.hashname,
                             entropy=SeededEntropy(f"{device.name}{value}{sim.now}"),
                             now_ms=sim.now)
    return str(event["id"])


def assert_exactly_once(sim: Sim, expected: int) -> None:
    assert len(sim.executed) == expected, sim.executed
    for key, who in sim.executed.items():
        assert len(who) == 1, (key, who)
    # Every device ends up with every done-marker and the same state.
    snaps = {d.replica.encode_snapshot() for d in sim.devices}
    assert len(snaps) == 1


def test_exactly_once_with_three_devices_online() -> None:
    sim = make_sim(3)
    a, b, c = sim.devices
    heavy_a = reading(sim, a, 85)
    heavy_b = reading(sim, b, 90)
    reading(sim, c, 10)  # no rule fires
    _info, scan_event, _ = s.open_thing(c.replica, me=c.identity.hashname,
                                        entropy=SeededEntropy("scan"), now_ms=sim.now)
    sim.advance(20 * MINUTE)
    # two heavy readings, one scan, one schedule occurrence
    assert_exactly_once(sim, 4)
    by_event = {k[1]: v[0] for k, v in sim.executed.items()}
    assert by_event[heavy_a] == "A" and by_event[heavy_b] == "B"  # the origin handles
    assert by_event[scan_event["id"]] == "C"
    alerts = [v["value"] for _h, _r, v in a.replica.log("alerts")]
    assert sorted(alerts) == [85, 90]
    # The schedule went to the first candidate, deterministically.
    sched_key = next(k for k in sim.executed if k[1].startswith("schedule"))
    event = r.Event(sched_key[1], "schedule", "", 0)
    first = r.candidates(event, [d.identity.hashname for d in sim.devices])[0]
    assert sim.executed[sched_key] == [next(d.name for d in sim.devices
                                            if d.identity.hashname == first)]
    notes = sorted(a[0] for _d, a in sim.external)
    assert notes == ["notify_owner"] * 4


def test_takeover_when_the_origin_goes_down_and_skip_after_it_returns() -> None:
    sim = make_sim(3)
    a, b, c = sim.devices
    eid = reading(sim, a, 99)
    sim.sync()  # the event reached B and C, then A went down before handling it
    a.online = False
    sim.advance(3 * MINUTE)
    rule_key = next(k for k in sim.executed if k[1] == eid)
    assert sim.executed[rule_key][0] in ("B", "C")
    a.online = True  # A restarts: a new runner, which settles before overdue work
    a.runner = r.RuleRunner(a.identity.hashname, [d.identity.hashname for d in sim.devices],
                            started_ms=sim.now)
    sim.advance(3 * MINUTE)  # A merges the done-marker during the settle time, then skips
    executed_by_a = [k for k, v in sim.executed.items() if "A" in v and k[1] == eid]
    assert executed_by_a == []
    assert len(sim.executed[rule_key]) == 1


def test_schedule_host_partitioned_away_next_candidate_takes_over() -> None:
    sim = make_sim(3)
    hosts = [d.identity.hashname for d in sim.devices]
    occurrence = r.schedule_events(
        r.load_rules(sim.devices[0].replica)[0], since_ms=START, now_ms=START + 10 * MINUTE)[0]
    order = r.candidates(occurrence, hosts)
    first = next(d for d in sim.devices if d.identity.hashname == order[0])
    second = next(d for d in sim.devices if d.identity.hashname == order[1])
    first.online = False
    sim.advance(10 * MINUTE)
    key = next(k for k in sim.executed if k[1] == occurrence.id)
    assert sim.executed[key] == [second.name]
    first.online = True  # the first candidate wakes up (it was asleep, not partitioned)
    first.runner.resume(sim.now)
    sim.advance(5 * MINUTE)
    assert sim.executed[key] == [second.name]
    assert r.done_by(first.replica, *key) == (second.identity.hashname,)


def test_python_handlers_run_exactly_once_across_devices() -> None:
    registry = r.HandlerRegistry()
    seen: list[str] = []

    @registry.on("reading_added")
    def on_reading(event: r.Event) -> str:
        seen.append(event.id)
        return event.id

    with pytest.raises(RuleError):
        registry.on("exploded")
    sim = make_sim(3, registry)
    a, b, _c = sim.devices
    ids = [reading(sim, a, 1), reading(sim, b, 2)]
    sim.advance(5 * MINUTE, registry=registry)
    assert sorted(seen) == sorted(ids)
    assert registry.handlers_for("reading_added") == [on_reading]


def test_exactly_once_with_one_device_and_a_restart() -> None:
    sim = make_sim(1)
    (a,) = sim.devices
    eid = reading(sim, a, 81)
    sim.advance(20 * MINUTE)
    assert_exactly_once(sim, 2)  # the heavy reading and the schedule occurrence
    assert any(k[1] == eid for k in sim.executed)
    # A restarted runner (same replica, so the same done-markers) repeats nothing.
    a.runner = r.RuleRunner(a.identity.hashname, [a.identity.hashname], started_ms=START)
    sim.advance(20 * MINUTE)
    assert_exactly_once(sim, 2)
    assert a.runner.get_timer() is None


def test_long_partition_duplicate_is_visible_after_merge() -> None:
    """Availability over coordination: cut off for longer than the takeover delay, two
    devices both handle; the merged done-marker shows both (docs/things.md)."""
    sim = make_sim(2)
    a, b = sim.devices
    eid = reading(sim, a, 95)
    sim.sync()
    # Partition: both online but not syncing. A handles at once; B takes over after a minute.
    sim.advance(3 * MINUTE, sync=False)
    key = next(k for k in sim.executed if k[1] == eid)
    assert sorted(sim.executed[key]) == ["A", "B"]
    sim.sync()
    assert sorted(r.done_by(a.replica, *key)) == sorted([a.identity.hashname,
                                                         b.identity.hashname])


def test_runner_timer_says_when_to_take_over() -> None:
    sim = make_sim(2)
    a, b = sim.devices
    reading(sim, a, 99)
    sim.sync()
    b.runner.observe(b.replica, sim.now)
    assert b.runner.due(b.replica, sim.now) == []
    assert b.runner.get_timer() == sim.now + r.TAKEOVER_MS
    assert len(b.runner.due(b.replica, sim.now + r.TAKEOVER_MS)) == 1
