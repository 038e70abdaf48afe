"""Static HTML reports, in the spirit of fMRIPrep / FitLins reports.

* ``output_dir/sub-<id>.html`` + ``sub-<id>/figures/*.png``: :func:`write_participant_reports`
* ``output_dir/group.html`` + ``group/figures/*.png``: :func:`write_group_report`

The reports open offline: figures are PNG files next to the HTML, referenced by relative
path; the style sheet (``data/report.css``) is embedded; there is no JavaScript. Every HTML
and PNG file is written atomically (:func:`bids_llm_encode.derivatives.atomic_path`).

Robustness rules: a missing *required* output (no ``networks.tsv`` for a scan, no group
``networks.tsv`` at all) raises :class:`~bids_llm_encode.errors.AppError` with one line;
a missing *optional* file skips its section with a note; a figure that fails to draw becomes
an error note in the report (and a logged warning), never a crash of the run.

Modules: :mod:`.page` (the HTML page), :mod:`.figures` (drawing, statmaps on disk),
:mod:`.tables` (the networks TSVs), :mod:`.sections` (sections of both reports),
:mod:`.participant` and :mod:`.group` (the two reports).
"""

from .group import write_group_report
from .participant import ScanRef, write_participant_reports

__all__ = ["ScanRef", "write_group_report", "write_participant_reports"]
