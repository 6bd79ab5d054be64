"""stockvol: the Kaggle stock-market dataset through Spark, Delta Lake and MLlib to a prediction API."""

__version__ = "0.1.0"
