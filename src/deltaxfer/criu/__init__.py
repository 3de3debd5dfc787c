"""CRIU: finding and running the binary, reading and writing its image files."""
