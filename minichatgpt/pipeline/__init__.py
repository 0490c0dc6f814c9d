"""The edges of the DVC pipeline: artifact schemas and atomic writes, the data set,
held-out evaluation and the plot data."""
