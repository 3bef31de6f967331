"""Reports: tables (mean ± std over seeds, as CSV, markdown and LaTeX) and figures (PNG)."""
