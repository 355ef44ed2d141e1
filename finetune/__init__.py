"""Stage 3: end-to-end training of backbone + cleaner + classifier."""
