"""Prefill worker: computes prompt KV and pushes it, layer by layer, to decode workers."""
