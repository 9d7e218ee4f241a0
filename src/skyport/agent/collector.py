"""The cyclic garbage collector's thresholds for Sky Port's long-running processes.

Python collects its youngest objects after every 700 net allocations (its default: 700, 10, 10). The
core, a node agent and an agent pool allocate objects for every request, message and job that die
young, almost none of them in cycles, so at the default they collect far more often than they find
anything: the core ran ~190 young collections, 17 older and one full for 2,000 trivial jobs, 157 ms of
CPU (gc callbacks, the local-throughput bench's own-account run); at 7,000 it ran 5 young ones (10 ms).
An agent pool runs ~145 young collections while it starts (its imports, before the thresholds are
set) and few after.
What a process makes at start-up (modules, models, routes) lives as long as it does: each also
``gc.freeze()``-s it once started, out of the full collections' way.
"""

from __future__ import annotations

GC_THRESHOLDS = (7000, 10, 10)
