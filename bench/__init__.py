"""jhvp's benchmarks: `python -m bench --help`."""
