"""A user's own model and data, trained by localsgd through ``_target_`` (see ../README.md)."""
