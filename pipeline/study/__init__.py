"""The findings study: its plan, the sweep that runs it as DVC experiments, the decision rule and the report.

No stage runs this code.
"""
