"""Example models the shipped recipes name (each needs the ``examples`` extra)."""
