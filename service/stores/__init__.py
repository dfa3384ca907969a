"""Session stores: memory (default) and redis, one file each."""
