"""Weight import from other implementations, converted at the border."""
