"""Integrations with other libraries, each imported on its own (its library is an optional extra).

- :mod:`flexcomp.integrations.transformers`: ``attn_implementation="flexcomp"`` for HF transformers.
"""
