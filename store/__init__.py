"""The HDF5 feature store: schema, resumable writer, validating reader."""
