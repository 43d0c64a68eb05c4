"""numpy values as plain JSON values, for everything the store writes as JSON or Parquet: array attributes
(zarr.json), manifest and table rows, stage summaries (_complete.json)."""
from __future__ import annotations

import numpy as np


def plain_json(o):
    """json.dumps' `default` for numpy values (a scalar as its Python value, an array as nested lists); anything
    else is refused with TypeError, as zarr-python refuses it in an array's attributes."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"attribute value {o!r} ({type(o).__name__}) is not JSON")


def plain_json_or_text(o):
    """json.dumps' `default` for summaries: numpy values as plain ones, anything else as its text."""
    try:
        return plain_json(o)
    except TypeError:
        return str(o)


def plain_rows(rows: list[dict]) -> list[dict]:
    """Rows as plain Python values (numpy values converted, tuples as lists), every row with every key: pyarrow
    takes a table's columns from its first row."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = []
    for r in rows:
        d = {}
        for k in keys:
            v = r.get(k)
            if isinstance(v, (np.generic, np.ndarray)):
                v = plain_json(v)
            elif isinstance(v, tuple):
                v = list(v)
            d[k] = v
        out.append(d)
    return out
