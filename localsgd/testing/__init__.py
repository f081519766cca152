"""Test support shipped with the package (fault injection for the reliability tests)."""
