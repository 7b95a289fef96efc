"""Reports: paper-shaped tables, plots and checkpoint rankings built from ``result.json`` records only."""
