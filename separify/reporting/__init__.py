"""The before/after report: measured figures, tables, JSON and HTML."""

from separify.reporting.report import *  # noqa: F401,F403
from separify.reporting.report import (SCHEMA, SCHEMA_VERSION, Comparison, Latency, LayerFigures,  # noqa: F401
                                       ModelFigures, NotMeasured, Quality, Report, Timing, compare, layer_table,
                                       print_comparison, print_report, report, report_onnx, schema, totals_table,
                                       write_json)
