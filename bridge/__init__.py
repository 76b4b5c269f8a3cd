"""eimis-bridge: a Matrix application service joining health-sector messaging tools to EIMIS."""

__version__ = "0.1.0"
