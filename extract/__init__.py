"""Stage 1: backbones, data sources, image preprocessing and the extraction loop."""
