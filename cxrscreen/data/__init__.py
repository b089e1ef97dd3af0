"""Datasets: manifests, patient-level splits, near-duplicate audit, Parquet ingest, phantoms."""
