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
