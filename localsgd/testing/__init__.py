"""Test support shipped with the package: fault injection for the reliability tests (``faults``) and a
spawner that runs a function on N real ranks started as the trainer starts them (``ranks``)."""
