"""MindSpore runs a full ``gc.collect()`` before every graph compile (``mindspore/graph/api.py``), and these
tests compile thousands of small graphs: 70 s of the directory's 7 CPU minutes went to those collections
(measured with ``gc.callbacks``), most of it scanning objects that live for the whole session (MindSpore's,
torch's and pytest's). Freezing what exists once the tests are collected leaves each collection the
objects made since; objects made by a test are still collected as before.
"""

import gc


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()
