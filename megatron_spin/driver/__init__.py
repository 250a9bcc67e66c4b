"""The driver: the pieces of ``main.py``'s step loop that run in the driver process.

``build`` assembles a run from its config; ``score`` turns completions into scored samples;
``step`` builds the step's pairs and metrics; ``evaluate`` scores held-out prompts; ``state``
is the record a checkpoint resumes from and ``checkpoint`` saves and loads it; ``stop`` is the
SIGUSR1 request to checkpoint and stop.  Ranks and engines live in ``orchestrate``; nothing
here runs inside them.
"""
