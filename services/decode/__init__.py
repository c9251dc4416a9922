"""Decode worker: reserves blocks, receives pushed KV, decodes in its continuous batch."""
