"""Engine implementations, one file per engine, each mapping its vendor's errors to Parley's."""
