"""stockvol: Kaggle stock CSVs through Spark, Delta Lake and MLlib to a prediction API."""

__version__ = "0.1.0"
