"""A synthetic chest CT with GGO of known volume, and the CT writer (the demo, the tests)."""
