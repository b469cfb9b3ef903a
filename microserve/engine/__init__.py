"""The inference engine: requests, scheduler, model runner, sampler, and the async driver."""
