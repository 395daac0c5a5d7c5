"""exporter.nvml.field_values decodes polled batches from their bytes: the same numbers as the ctypes
path (``fields.field_value``) for every value type NVML declares, errors left out."""

from __future__ import annotations

import pynvml

from exporter.nvml import field_values
from exporter.nvml.field_values import _FieldValue, decoded
from exporter.nvml.fields import field_value

# (value type, union member, values) - each type's extremes and an ordinary value.
CASES = [
    (pynvml.NVML_VALUE_TYPE_DOUBLE, "dVal", [0.0, -1.5, 3.25e18]),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", [0, 7, 2**32 - 1]),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG, "ulVal", [0, 12345, 2**32 + 5]),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", [0, 2**40 + 3, 2**64 - 1]),
    (pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG, "sllVal", [-(2**63), -1, 2**63 - 1]),
    (pynvml.NVML_VALUE_TYPE_SIGNED_INT, "siVal", [-(2**31), -2, 2**31 - 1]),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT, "usVal", [0, 300, 2**16 - 1]),
    (99, "uiVal", [42]),  # a type this nvidia-ml-py does not know: read as unsigned int, as field_value does
]


def test_raw_decoding_matches_the_ctypes_path() -> None:
    assert field_values._RAW_DECODING  # this platform takes the fast path the test is about
    entries = [(vt, member, v) for vt, member, values in CASES for v in values]
    array = (_FieldValue * (len(entries) + 1))()
    for fv, (vt, member, v) in zip(array, entries, strict=False):
        fv.value.ullVal = 0xA5A5A5A5A5A5A5A5  # the bytes a narrower member does not cover are not read
        fv.valueType, fv.nvmlReturn = vt, pynvml.NVML_SUCCESS
        setattr(fv.value, member, v)
    array[-1].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED  # an error: no value
    expected = [field_value(fv) for fv in array[:-1]] + [None]
    got = list(decoded([array]))
    assert got == expected
    assert [type(v) for v in got] == [type(v) for v in expected]
    assert got[1:3] == [-1.5, 3.25e18] and got[-2] == 42


def test_two_batches_in_order() -> None:
    first, second = (_FieldValue * 2)(), (_FieldValue * 1)()
    for arr, start in ((first, 0), (second, 2)):
        for j in range(len(arr)):
            arr[j].valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            arr[j].value.ullVal = start + j + 10
    assert list(decoded([first, second])) == [10, 11, 12]
