"""pdserve.v1 protos and their generated modules; regenerate with `python -m protos.generate`."""
