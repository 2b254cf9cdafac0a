"""Tests of the delivery senders (C-STORE, STOW-RS) and destination parsing."""
