"""Model zoo: native torch implementations loaded from Hugging Face model directories.

`model_config` (reading a model directory's config) needs no torch, so services that only read
configs and tokenizers (the gateway, the router) import it without loading torch; `loader` builds
and fills a model, `llama` is the implementation."""
