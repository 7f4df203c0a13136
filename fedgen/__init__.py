"""fedgen: federated genomic analysis with exact, PLINK-compatible results."""

__version__ = "0.1.0"
