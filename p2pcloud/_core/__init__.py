"""The CRDT merge core: the compiled Cython modules, or their pure-Python twin.

By default the compiled modules (``_cmerge``, built by ``setup.py``) run. Setting the
environment variable ``P2PCLOUD_PUREPYTHON=1`` selects the reference twin
(``_reference.py``), which is the specification: both agree on every state, delta, encoding
and change report. There is no silent fallback: if the compiled modules are missing and the
variable is not set, importing this package raises ImportError saying what to do.

``IMPLEMENTATION`` is ``"cython"`` or ``"python"``; ``p2pcloud.core_implementation()``
reports it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

PUREPYTHON_ENV = "P2PCLOUD_PUREPYTHON"

_impl: Any
if os.environ.get(PUREPYTHON_ENV, "") == "1":
    from p2pcloud._core import _reference as _impl

    IMPLEMENTATION = "python"
else:
    try:
        from p2pcloud._core import _cmerge as _impl  # type: ignore[attr-defined,no-redef,unused-ignore]
    except ImportError as exc:
        raise ImportError(
            "the compiled CRDT merge core (p2pcloud._core._cmerge) is missing. Build it with "
            "`python setup.py build_ext --inplace` (or reinstall the package with a C compiler "
            f"and Cython), or set {PUREPYTHON_ENV}=1 to run the pure-Python twin."
        ) from exc
    IMPLEMENTATION = "cython"

if TYPE_CHECKING:
    # Both implementations have the reference's API: type-check callers against it.
    from p2pcloud._core._reference import (
        FORMAT_VERSION,
        MAX_CLOCK_SKEW_MS,
        BlobRef,
        CausalContext,
        HybridClock,
        Replica,
        decode_value,
        decode_version,
        encode_value,
        encode_version,
        hlc_pack,
        hlc_unpack,
    )
else:
    FORMAT_VERSION = _impl.FORMAT_VERSION
    MAX_CLOCK_SKEW_MS = _impl.MAX_CLOCK_SKEW_MS
    BlobRef = _impl.BlobRef
    CausalContext = _impl.CausalContext
    HybridClock = _impl.HybridClock
    Replica = _impl.Replica
    decode_value = _impl.decode_value
    decode_version = _impl.decode_version
    encode_value = _impl.encode_value
    encode_version = _impl.encode_version
    hlc_pack = _impl.hlc_pack
    hlc_unpack = _impl.hlc_unpack
from p2pcloud._core._span import delta_span  # noqa: E402  (header only: one implementation)

Change = tuple[str, str | None, str | None]
"""What a merge touched: ``(collection, document, field)``; ``(log, None, None)`` for logs."""

__all__ = [
    "FORMAT_VERSION",
    "IMPLEMENTATION",
    "MAX_CLOCK_SKEW_MS",
    "BlobRef",
    "CausalContext",
    "Change",
    "HybridClock",
    "Replica",
    "decode_value",
    "delta_span",
    "decode_version",
    "encode_value",
    "encode_version",
    "hlc_pack",
    "hlc_unpack",
]
