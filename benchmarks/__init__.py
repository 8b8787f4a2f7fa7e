"""pyhappy's benchmark suite: ``python -m benchmarks`` (or the console script ``pyhappy-bench``).

One module per op family, discovered automatically: every ``benchmarks/<name>.py`` (not starting
with ``_``, not ``common``) that defines

    FAMILY = "quant_linear"                    # the name --family selects
    def cases(device, quick) -> list[common.Case]   # what to time on this device

is a family. Optional hooks:

    def backend_of(device, dtype) -> str       # the pyhappy backend serving the op (recorded)
    def summary(results, device) -> list[str]  # lines checking the family's targets

``cases`` must not allocate anything: each ``Case.setup()`` builds its inputs when the case runs
(and they are freed after it). Timing, machine limits, roofline, environment record, console
table, JSON / markdown / PNG are shared (benchmarks/common.py). See benchmarks/lora_linear.py.
"""
