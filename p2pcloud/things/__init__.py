"""Things and their tags (DESIGN.md section 7; docs/things.md).

A thing is an owned object with a sub-cloud of its own, reached by scanning its QR tag:

* :mod:`p2pcloud.things.thing`: keys, sub-cloud id, the digital-twin layout, listing helpers,
  the thing key sealed to the cloud's members;
* :mod:`p2pcloud.things.tags`: the ``p2pcloud:`` tag URI, QR rendering and photo decoding;
* :mod:`p2pcloud.things.scan`: what a scan means (claim, open, finder) and the ``thing``
  channel messages, with the finder's allow-list;
* :mod:`p2pcloud.things.rules`: rules as data, their parser and evaluator, exactly-once
  handling across the owner's devices, Python handlers;
* :mod:`p2pcloud.things.transfer`: handing a thing on to another person's cloud.

Everything here is pure (no I/O, no clock, randomness passed in); the Trio shell wires it to
the mesh and the store.
"""

from p2pcloud.things.rules import (
    Event,
    HandlerRegistry,
    Rule,
    RuleRunner,
    add_rule,
    evaluate,
    load_rules,
    parse_rule,
)
from p2pcloud.things.scan import (
    CHANNEL_TYPE,
    ScanDecision,
    Served,
    claim_here,
    decide_scan,
    open_thing,
    serve_request,
)
from p2pcloud.things.tags import (
    Tag,
    TagPath,
    claimed_tag,
    fresh_tag,
    parse_tag,
    render_png,
    render_sheet,
    render_svg,
    render_text,
    scan_image,
)
from p2pcloud.things.thing import (
    NewThing,
    ThingInfo,
    create_layout,
    list_things,
    new_thing,
    open_thing_key,
    reseal_thing_key,
    sealing_members,
    thing_info,
)
from p2pcloud.things.transfer import (
    TransferPackage,
    TransferRecord,
    accept_transfer,
    end_access,
    prepare_transfer,
)

__all__ = [
    "CHANNEL_TYPE",
    "Event",
    "HandlerRegistry",
    "NewThing",
    "Rule",
    "RuleRunner",
    "ScanDecision",
    "Served",
    "Tag",
    "TagPath",
    "ThingInfo",
    "TransferPackage",
    "TransferRecord",
    "accept_transfer",
    "add_rule",
    "claim_here",
    "claimed_tag",
    "create_layout",
    "decide_scan",
    "end_access",
    "evaluate",
    "fresh_tag",
    "list_things",
    "load_rules",
    "new_thing",
    "open_thing",
    "open_thing_key",
    "parse_rule",
    "parse_tag",
    "prepare_transfer",
    "render_png",
    "render_sheet",
    "render_svg",
    "render_text",
    "reseal_thing_key",
    "scan_image",
    "sealing_members",
    "serve_request",
    "thing_info",
]


def __getattr__(name: str) -> object:
    # Smart things run a node (trio, sockets): import it only when asked for, so that this
    # package stays pure on import (p2pcloud/_node/smartthing.py).
    if name in ("run_thing", "ThingNode"):
        from p2pcloud._node import smartthing

        return getattr(smartthing, name)
    raise AttributeError(f"module 'p2pcloud.things' has no attribute {name!r}")
