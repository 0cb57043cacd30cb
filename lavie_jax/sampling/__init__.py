"""Sampling: prompts in, videos out, per stage (`stages.StageSampler`) and for the cascade (`cascade.Cascade`)."""
