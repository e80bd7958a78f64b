"""Test helpers: tiny models and Tasks with exact references, synthetic stores, and child-process workers."""
