"""Test support: a real centripy server process and the external services tests use."""
