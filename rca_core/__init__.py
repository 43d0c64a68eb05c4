"""rca_core: the RCA weakly supervised semantic segmentation library (no Prefect/Ray inside)."""

__version__ = "0.1.0"
