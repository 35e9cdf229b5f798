"""Reporting: statistics, tables and reproductions of papers, read from finished run directories."""
