"""The backends that keep their state in this process."""
