"""Where runs live: the storage protocol, local disk, S3, and run-directory snapshots."""
