"""One adapter's catalogue in several processes: which cases each part runs, and how the parts' saved
results become the adapter's.

``xnorm conformance --jobs N`` deals every adapter out in ``N * PARTS_PER_PROCESS`` parts (``xnorm.cli``)
to ``N`` processes, each taking the next part when it is free: whole adapters side by side left one core
idle while the longest ran on (``mindspore-graph`` took as long as MindSpore's three other adapters
together). A part saves under
``<results>/.parts/<adapter>/<k>-of-<n>/<adapter name>/``; once all parts ended, :func:`merge_parts`
writes each adapter's folder as a single process would have (``summary.json``, ``arrays.npz``,
``report.md``, ``run.log``), the cases in catalogue order. A case's results do not depend on which
cases ran before it in its process: the runner seeds the adapter's generators from the case's id
(:meth:`~xnorm.conformance.adapter.Adapter.seed`).

Cases are dealt in groups: consecutive cases of one layer configuration, dtype, device and
reparametrization (a weight-norm layer's dims, an orthogonal layer's maps). A backend reuses compiled
programs within such a group (MindSpore's graph adapters hand a layer and its wrappers on to the next
case of the same configuration), so a group never straddles two processes. Each group goes to the
part with the fewest cases so far, so every part gets its share of every dtype and reparametrization.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .runner import tally

__all__ = ["part_of", "merge_parts", "PARTS_FOLDER"]

#: under the results folder: the parts' own results until they are merged (then removed)
PARTS_FOLDER = ".parts"


def _group(case) -> tuple:
    # the fine-tuning case has no layer: it is a group of its own
    return (case.device, case.dtype, case.reparametrization, getattr(case, "layer", case.id))


def part_of(cases: Sequence, part: int, parts: int) -> List:
    """The cases of part ``part`` (0-based) of ``parts``, in catalogue order; the parts together hold
    every case exactly once."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: give 0 <= part < parts")
    groups: List[List] = []
    for case in cases:
        if groups and _group(groups[-1][0]) == _group(case):
            groups[-1].append(case)
        else:
            groups.append([case])
    dealt: List[List] = [[] for _ in range(parts)]
    for group in groups:
        min(dealt, key=len).extend(group)
    return dealt[part]


def merge_parts(part_folders: Sequence[Path], target: Path, order: Sequence[str], log_name: str) -> dict:
    """Write one adapter's results into ``target`` from its parts' folders (each holding a
    ``summary.json``, ``arrays.npz`` and ``log_name``) and return the merged summary.

    ``order``: every case id of the catalogue in its order (the merged cases follow it). Counts are
    recounted from the cases; ``absent_devices`` and ``devices`` are the union of the parts'. A case id in
    two parts is a bug in the dealing and raises.
    """
    from .report import adapter_report

    summaries = [json.loads((Path(folder) / "summary.json").read_text()) for folder in part_folders]
    if not summaries:
        raise ValueError("no part to merge")
    position = {case_id: index for index, case_id in enumerate(order)}
    cases = [case for summary in summaries for case in summary["cases"]]
    ids = [case["id"] for case in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{summaries[0]['adapter']}: parts ran the same case twice")
    cases.sort(key=lambda case: position.get(case["id"], len(position)))
    merged = dict(summaries[0])
    merged.update(
        devices=sorted({device for summary in summaries for device in summary["devices"]}),
        absent_devices=sorted({device for summary in summaries for device in summary["absent_devices"]}),
        finished=max(summary["finished"] for summary in summaries),
        **tally(cases),
        cases=cases,
        log=f"{target.name}/{log_name}",
    )
    target.mkdir(parents=True, exist_ok=True)
    arrays: Dict[str, np.ndarray] = {}
    with open(target / log_name, "wb") as log:
        for index, folder in enumerate(part_folders):
            with np.load(Path(folder) / "arrays.npz") as part_arrays:
                arrays.update({key: part_arrays[key] for key in part_arrays.files})
            log.write(f"==> part {index + 1} of {len(part_folders)} <==\n".encode())
            part_log = Path(folder) / log_name
            if part_log.exists():
                with open(part_log, "rb") as source:
                    shutil.copyfileobj(source, log)
    (target / "summary.json").write_text(json.dumps(merged, indent=1, allow_nan=True))
    np.savez_compressed(target / "arrays.npz", **arrays)
    (target / "report.md").write_text(adapter_report(merged))
    return merged
