"""The inference engine both prefill and decode workers run: paged KV, scheduler, sampler, model runner."""
