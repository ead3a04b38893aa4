"""Plot faces: functions that take xarray results and return matplotlib Figures (Agg backend)."""
