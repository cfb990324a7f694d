"""Model weights as one array on the wire, named arrays everywhere else.

Flower sends a message as a tree of objects, each array one object (plus its chunk), and every object is a
request to the SuperLink on the way up and another on the way down: with CancerMoE's ~55 weight tensors a
message was ~92 objects, ~1,100 requests through the SuperLink a round for 3 sites, which on a loaded 2-core
machine took longer than the training (README, "Federation" benchmark). So at the transport boundary only, the
``arrays`` ArrayRecord of a message travels as one flat array (``packed``) with its layout (names and shapes, in
order) in a ConfigRecord beside it: the coordinator packs what it pushes and unpacks what it pulls
(`server.exchange`), the site unpacks what arrives and packs what it replies (`client.app.packing_mod`, the
outermost mod). Every handler, mod, check, the audit log and the coordinator's aggregation see the named arrays,
the same values; the bytes on the wire are the same values concatenated. Arrays of different dtypes are left
unpacked (CancerMoE's are all float32).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

ARRAYS = "arrays"  # the record that carries the model's weights, both ways
LAYOUT = "arrays-layout"  # beside a packed ``arrays``: names, ndims, shapes (flattened), in packing order
PACKED = "packed"  # the one array of a packed ``arrays``


def is_packed(content: RecordDict) -> bool:
    return LAYOUT in content


def pack(content: RecordDict) -> RecordDict:
    """``content`` with its ``arrays`` as one flat array and the layout beside it; unchanged when there is
    nothing to gain (no ``arrays``, fewer than two arrays, several dtypes) or it is packed already."""
    record = content.get(ARRAYS) if ARRAYS in content else None
    if not isinstance(record, ArrayRecord) or is_packed(content) or len(record) < 2:
        return content
    arrays = {name: array.numpy() for name, array in record.items()}
    if len({a.dtype for a in arrays.values()}) != 1:
        return content
    packed = RecordDict({key: value for key, value in content.items() if key != ARRAYS})
    packed[ARRAYS] = ArrayRecord({PACKED: Array(np.concatenate([a.ravel() for a in arrays.values()]))})
    packed[LAYOUT] = ConfigRecord({"names": list(arrays), "ndims": [int(a.ndim) for a in arrays.values()],
                                   "shapes": [int(d) for a in arrays.values() for d in a.shape] or [0]})
    return packed


def unpack(content: RecordDict) -> RecordDict:
    """The named arrays back from a packed ``content`` (unchanged if not packed); `ValueError` when the layout
    and the array do not fit together."""
    if not is_packed(content):
        return content
    try:
        layout = content[LAYOUT]
        names, ndims, dims = list(layout["names"]), [int(n) for n in layout["ndims"]], list(layout["shapes"])
        flat = content[ARRAYS][PACKED].numpy()
    except (KeyError, TypeError) as exc:
        raise ValueError(f"packed arrays without a readable layout ({exc})") from None
    if len(names) != len(ndims) or sum(ndims) > len(dims):
        raise ValueError("packed arrays: the layout's names, ranks and shapes do not match")
    arrays, at, offset = {}, 0, 0
    for name, ndim in zip(names, ndims, strict=True):
        shape = tuple(int(d) for d in dims[at:at + ndim])
        at += ndim
        size = int(np.prod(shape, dtype=np.int64))
        if offset + size > flat.size:
            raise ValueError(f"packed arrays: {flat.size} values, the layout needs more")
        arrays[name] = Array(np.ascontiguousarray(flat[offset:offset + size].reshape(shape)))
        offset += size
    if offset != flat.size:
        raise ValueError(f"packed arrays: {flat.size} values, the layout describes {offset}")
    unpacked = RecordDict({key: value for key, value in content.items() if key not in (ARRAYS, LAYOUT)})
    unpacked[ARRAYS] = ArrayRecord(arrays)
    return unpacked
