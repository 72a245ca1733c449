"""Datasets the library can generate offline, for tests, demos and recipes that must run without a download."""
