"""Demo and experiment tasks built on orw_fast: the even-digits demo (``demo``), the text-conditioned digits model
and its alignment task (``text_digits``, ``text_alignment``), the experiments' alpha x seed sweeps (``sweeps``) and
tiny diffusers pipelines built offline for tests and benchmarks (``tiny_pipelines``).

They are users of the library, not part of it: the core (ops, sampling, couplings, rewards, models, trainer,
checkpoint, distributed, cli) imports nothing from here.
"""
