"""The prediction API: Flask + gunicorn over the saved Spark PipelineModel, with no JVM.

Never imports pyspark; its only dependencies are flask, gunicorn, numpy and pyarrow.
"""
