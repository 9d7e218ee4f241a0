"""Elastic capacity: which flavor to instantiate for a job, and what a job will cost.

A flavor of a remote that can create partitions is capacity the scheduler can summon. The choice is
the decision only (the provisioning loop does the creating):

- a job that names a flavor runs on an existing, free partition of that flavor owned by its account if
  there is one (it is a plain placement), else on a new partition of that flavor;
- a job that names none but that no existing node could ever hold goes to the cheapest offer that fits
  it per node (cpus, memory, GPUs, storage), across remotes; a job some existing node can hold waits for
  it instead (elastic capacity is for what the static machine cannot do);
- among the offers that fit, the cheapest (then by remote and flavor id, for determinism) whose remote
  is not already creating as many partitions as it may (``max_creating - creating``, counting the
  provisions of this same plan); if every fitting remote is at its limit the job waits
  (``ProvisionLimit``), without blocking others;
- offers carry no labels, so a job that asks for labels never gets one.

Costs are ``price x nodes x walltime hours``; a node of a static partition (no flavor) costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from skyport.server.scheduler.resources import NodeClass
from skyport.server.scheduler.snapshot import FlavorOffer, PendingJob


def flavor_aliases(flavor: str, offers: Iterable[FlavorOffer]) -> frozenset[str]:
    """The names a flavor goes by: the one asked for and the id or name of every offer it matches."""
    names = {flavor}
    for o in offers:
        if flavor in (o.flavor_id, o.name):
            names.update((o.flavor_id, o.name))
    return frozenset(names)


def feasible_offers(job: PendingJob, offers: Sequence[FlavorOffer]) -> tuple[FlavorOffer, ...]:
    """Offers one of whose nodes holds the job's per-node request, cheapest first."""
    if job.labels:
        return ()
    fitting = [
        o
        for o in offers
        if (job.remote_id is None or o.remote_id == job.remote_id)
        and (job.flavor is None or job.flavor in (o.flavor_id, o.name))
        and job.cpus <= o.cpus
        and job.mem <= o.mem
        and job.gpus <= o.gpus
        and job.storage <= o.storage
    ]
    return tuple(sorted(fitting, key=lambda o: (o.price, o.remote_id, o.flavor_id, o.name)))


def room(offer: FlavorOffer, provisioning: Mapping[str, int]) -> bool:
    """Whether the offer's remote may start creating one more partition."""
    return offer.max_creating - offer.creating - provisioning.get(offer.remote_id, 0) > 0


def class_prices(classes: Sequence[NodeClass], offers: Sequence[FlavorOffer]) -> list[float]:
    """Price per node-hour of each node class: its flavor's price on its remote, 0 for static nodes."""
    prices: list[float] = []
    by_key: dict[tuple[str, str], float] = {}
    for o in sorted(offers, key=lambda o: (o.remote_id, o.flavor_id, o.name, o.price)):
        by_key.setdefault((o.remote_id, o.flavor_id), o.price)
        by_key.setdefault((o.remote_id, o.name), o.price)
    for c in classes:
        prices.append(0.0 if c.flavor is None else by_key.get((c.remote_id, c.flavor), 0.0))
    return prices
