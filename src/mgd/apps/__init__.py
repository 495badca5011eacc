"""MGD applications: dataset selection, data poisoning, learning-rate schedules.

Each application picks a metaparameter, an objective and a projection, calls the core, and
hands its result to one evaluation protocol (:mod:`mgd.apps.protocol`) shared with every
baseline.
"""
