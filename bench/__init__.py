"""The ademamix-cuda benchmark: `python -m bench --help`."""
