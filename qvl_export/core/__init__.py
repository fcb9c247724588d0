"""The leaf package every other package builds on: the model spec, the precision registry, part
and target names, the manifest schema and the error type. Pure Python (standard library only)."""
