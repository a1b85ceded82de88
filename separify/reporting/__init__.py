"""The before/after report: measured figures, tables, JSON and HTML.

Modules: :mod:`~separify.reporting.data` (the data model and its JSON form), :mod:`~separify.reporting.settings`
(:class:`ReportSettings`), :mod:`~separify.reporting.measure` (:func:`report`, :func:`report_onnx`),
:mod:`~separify.reporting.quality`, :mod:`~separify.reporting.layers` (per-layer rows),
:mod:`~separify.reporting.tables` (terminal), :mod:`~separify.reporting.comparison` (:func:`compare`),
:mod:`~separify.reporting.html` (HTML page and PNG).
"""

from separify.core.measure import Timing
from separify.reporting.comparison import compare
from separify.reporting.data import (SCHEMA, SCHEMA_VERSION, Comparison, Latency, LayerFigures, ModelFigures,
                                     NotMeasured, Quality, Report, schema, write_json)
from separify.reporting.layers import conv_desc
from separify.reporting.measure import report, report_onnx
from separify.reporting.settings import ReportSettings
from separify.reporting.tables import layer_table, print_comparison, print_report, totals_table

__all__ = ["Report", "ModelFigures", "Latency", "Quality", "LayerFigures", "NotMeasured", "Comparison", "Timing",
           "ReportSettings", "report", "report_onnx", "compare", "print_report", "print_comparison", "layer_table",
           "totals_table", "write_json", "schema", "SCHEMA", "SCHEMA_VERSION", "conv_desc"]
