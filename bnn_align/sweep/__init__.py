"""Studies as configs: a TOML grid expanded into train -> match -> evaluate steps, each cached
on disk under a key of everything it depends on, run as Ray tasks (or serially), with results
streamed into one table and reported as markdown tables and plots.

``bnn-align study CONFIG`` and ``bnn-align report RESULTS`` are the command-line front ends.
Ray, pandas and pyarrow come with the ``sweep`` extra; Ray is imported only to run on it.
"""

from .cache import Cache, CorruptEntry
from .config import Cell, Study, load_study, parse_study
from .report import write_report
from .results import compare_results, read_results
from .runner import RunSummary, run
from .select import RowFilter, parse_filter
from .steps import Step, expand

__all__ = ["Cache", "Cell", "CorruptEntry", "RowFilter", "RunSummary", "Step", "Study",
           "compare_results", "expand", "load_study", "parse_filter", "parse_study",
           "read_results", "run", "write_report"]
