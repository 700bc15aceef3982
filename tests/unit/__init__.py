"""Unit tests of the pure core: no event loop, no files (but the vectors), no sockets."""
