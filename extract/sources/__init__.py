"""Data sources: each reads one data set's real layout into SplitIndex objects."""
