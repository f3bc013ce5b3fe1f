"""The rules of a step's one host read (core/hostread.py), each checked on its own: what `make mutate` showed
no test held.

Values come back under their names, flattened, in the dtype asked for, with one `.tolist()` for any number of
reads; a name is registered once; a value is asked for only once read, and as what it was registered as.
"""

from __future__ import annotations

import pytest
import torch

from lightning_gradguard.core.hostread import HostRead
from tests.hostreads import host_reads


def test_values_come_back_by_name_flattened_from_one_read_of_several() -> None:
    first, second, empty, done = HostRead(), HostRead(), HostRead(), HostRead()
    first.put_each(("grad_bad", "loss_bad"), torch.tensor([0.0, 1.0]))
    first.put("layers", torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    first.put("total", torch.tensor(5.0))
    second.put("layers", torch.tensor([6.0]))
    second.put_each(("grad_bad",), torch.tensor([7.0]))
    done.put_each(("x",), torch.tensor([8.0]))
    done.read()
    assert not first.done and not second.done and not empty.done
    with host_reads() as calls:
        HostRead.read_all([first, empty, done, second])
    assert [c.what for c in calls] == ["Tensor.tolist"]  # one read for all of them
    assert first.done and second.done and empty.done
    assert (first["grad_bad"], first["loss_bad"]) == (0.0, 1.0)
    assert first.vector("layers") == [1.0, 2.0, 3.0, 4.0] and first.vector("total") == [5.0]
    assert second.vector("layers") == [6.0] and second["grad_bad"] == 7.0
    assert done["x"] == 8.0  # read before: kept
    with host_reads() as calls:
        HostRead.read_all([first, second])  # already read: nothing to do
    assert calls == []


def test_a_single_part_is_read_as_the_dtype_asked_for() -> None:
    read = HostRead(torch.float64)
    read.put("x", torch.tensor([0.1], dtype=torch.float64))
    read.read()
    assert read.vector("x") == [0.1]  # exactly: not rounded through float32
    narrow = HostRead()
    narrow.put_each(("y",), torch.tensor([0.1], dtype=torch.float64))
    narrow.read()
    assert narrow["y"] == torch.tensor(0.1, dtype=torch.float32).item()  # the default: float32


def test_several_parts_are_read_as_the_dtype_asked_for() -> None:
    read = HostRead(torch.float64)
    read.put_each(("a",), torch.tensor([1], dtype=torch.int64))
    read.put("b", torch.tensor([0.1], dtype=torch.float64))
    read.read()
    assert (read["a"], read.vector("b")) == (1.0, [0.1])
    narrow = HostRead()  # float32: several float64 parts are rounded, as a single one is
    narrow.put_each(("a",), torch.tensor([0.1], dtype=torch.float64))
    narrow.put("b", torch.tensor([0.2], dtype=torch.float64))
    narrow.read()
    as32 = torch.tensor([0.1, 0.2], dtype=torch.float32).tolist()
    assert [narrow["a"], *narrow.vector("b")] == as32 != [0.1, 0.2]


def test_contains_get_and_a_reads_with_nothing_registered() -> None:
    read = HostRead()
    read.put_each(("flag",), torch.tensor([2.0]))
    read.put("vec", torch.tensor([1.0, 2.0]))
    assert "flag" in read and "vec" in read and "other" not in read
    read.read()
    assert read.get("flag", -1.0) == 2.0 and read.get("other", -1.0) == -1.0
    nothing = HostRead()
    nothing.read()
    assert nothing.done and nothing.get("x", 3.0) == 3.0


@pytest.mark.parametrize("order", ["put, put", "put, put_each", "put_each, put", "put_each, put_each", "in one"])
def test_a_name_is_registered_once(order: str) -> None:
    read = HostRead()
    first, second = order.split(", ") if order != "in one" else ("in one", "")
    if first == "put":
        read.put("x", torch.ones(2))
    elif first == "put_each":
        read.put_each(("x", "y"), torch.ones(2))
    with pytest.raises(KeyError) as info:
        if first == "in one":
            read.put_each(("z", "x", "x"), torch.ones(3))
        elif second == "put":
            read.put("x", torch.ones(1))
        else:
            read.put_each(("w", "x"), torch.ones(2))
    assert info.value.args == ("HostRead: 'x' is registered twice.",)


def test_put_each_takes_one_value_per_name() -> None:
    read = HostRead()
    with pytest.raises(ValueError) as info:
        read.put_each(("a", "b"), torch.ones(3))
    assert str(info.value) == "Expected 2 values for ['a', 'b'], but got (3,)."


def test_values_are_asked_for_once_read_and_as_what_they_were_registered_as() -> None:
    read = HostRead()
    read.put_each(("flag",), torch.tensor([1.0]))
    read.put("vec", torch.tensor([1.0, 2.0]))
    for ask in (lambda: read["flag"], lambda: read.vector("vec")):
        with pytest.raises(RuntimeError) as info:
            ask()
        assert str(info.value) == "HostRead: the values were not read yet; call read() first."
    read.read()
    for name in ("vec", "missing"):
        with pytest.raises(KeyError) as error:
            read[name]
        assert error.value.args == (f"HostRead: {name!r} is not a one-value entry; use vector().",)
