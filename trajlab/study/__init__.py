"""The study built on capture: experiments (configs + prompt suites), hybrid inference, sweeps, demo.

Import the submodules you need (``from trajlab.study import hybrid``); ``trajlab.study.cli``
registers the ``experiment``, ``report`` and ``demo`` subcommands of ``python -m trajlab``.
"""
