"""The catalog's numbering of slides and transforms: a number is given once, and only to what was made."""

import threading

import pytest

from stainmil.view.catalog import Catalog


def test_a_slide_that_fails_to_be_made_takes_no_number_from_the_next():
    catalog = Catalog.__new__(Catalog)  # the numbering alone, without a folder
    catalog._lock, catalog._numbers, items = threading.RLock(), {}, []

    def broken(number):
        raise OSError("unreadable patch file")

    with pytest.raises(OSError):
        catalog._number("a", items, broken)
    assert catalog._number("b", items, lambda n: f"slide {n}") == 0 and items == ["slide 0"]
    assert catalog._number("b", items, lambda n: "made twice") == 0 and items == ["slide 0"]
    with pytest.raises(OSError):  # asked again, "a" is made again (and fails again), never answered with b's slide
        catalog._number("a", items, broken)
    assert catalog._number("a", items, lambda n: f"slide {n}") == 1 and items == ["slide 0", "slide 1"]
