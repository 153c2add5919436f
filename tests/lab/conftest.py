"""Kernel-lab tests: fixtures live in tests/conftest.py (clean_dm, loop_device,
make_device, dmsetup), shared with the engine conformance suite."""
